"""Flow control keeps the claim cheap: with ~20,000 delayed jobs, the claim (claim_v1, as a
worker calls it) walks jobs_ready_idx and reads a handful of rows, with or without paused
workflows; and the flow-control lookups use their indexes. The claim's scans are counted
with PostgreSQL's per-transaction statistics, which see inside the PL/pgSQL function (an
EXPLAIN of the function call would not)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from plans import explain_query, scans_of

DELAYED = 19_500
DUE = 500


@pytest.fixture
async def loaded(db: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db.dsn)
    await conn.execute(
        """
        INSERT INTO durable.runs (id, workflow, queue, input, current_node, priority)
        SELECT 'r' || g, CASE WHEN g % 2 = 0 THEN 'q' ELSE 'other' END,
               CASE WHEN g % 2 = 0 THEN 'q@x' ELSE 'other@y' END, '{}', 'n', (g % 3) - 1
        FROM generate_series(1, $1) AS g;
        INSERT INTO durable.jobs (queue, task, run_id, run_at, priority)
        SELECT r.queue, 'advance', r.id, now() - interval '1 second', r.priority
        FROM durable.runs r;
        INSERT INTO durable.jobs (queue, task, run_id, run_at)
        SELECT 'q@x', 'compensate', 'r' || (2 * (g % 250 + 1)), now() + g * interval '1 second'
        FROM generate_series(1, $2) AS g
        ON CONFLICT DO NOTHING;
        INSERT INTO durable.jobs (queue, task, run_id, run_at)
        SELECT 'q@x', 'branch', NULL, now() + g * interval '1 second'
        FROM generate_series(1, $2) AS g;
        ANALYZE durable.jobs;
        ANALYZE durable.runs;
        """.replace("$1", str(DUE)).replace("$2", str(DELAYED))
    )
    yield conn
    await conn.execute("DELETE FROM durable.jobs; DELETE FROM durable.runs")
    await conn.close()


async def _claim_scans(dsn: str, queues: list[str]) -> dict[str, Any]:
    """Claim once on a fresh connection (its statistics hold nothing else yet), then roll
    back; the transaction's scans of `jobs`."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM durable.claim_v1($1::text[], NULL, NULL, false)", queues
            )
            stats = await conn.fetchrow(
                """
                SELECT pg_stat_get_xact_numscans('durable.jobs'::regclass) AS seq_scans,
                       pg_stat_get_xact_numscans('durable.jobs_ready_idx'::regclass)
                           AS ready_scans,
                       pg_stat_get_xact_tuples_returned('durable.jobs_ready_idx'::regclass)
                           AS read
                """
            )
            raise _Rollback(row, stats)
    except _Rollback as done:
        row, stats = done.args
    finally:
        await conn.close()
    assert stats is not None
    return {"row": row, **dict(stats)}


class _Rollback(Exception):
    """Leaves the claim's transaction without committing it."""


@pytest.mark.parametrize("paused", [[], ["other"]], ids=["none_paused", "one_paused"])
async def test_the_claim_walks_the_ready_index_and_reads_a_few_rows(
    db: Any, loaded: asyncpg.Connection, paused: list[str]
) -> None:
    for name in paused:
        await loaded.execute("SELECT durable.pause_workflow_v1($1)", name)
    got = await _claim_scans(db.dsn, ["q@x", "other@y"])
    assert got["row"] is not None
    assert got["row"]["queue"] in (["q@x"] if paused else ["q@x", "other@y"])
    assert got["seq_scans"] == 0, got
    assert got["ready_scans"] >= 1, got
    # The most urgent due job is first in the index: not a walk over the delayed ones.
    assert 1 <= got["read"] < 50, got


async def test_a_paused_workflows_jobs_are_not_claimed(db: Any, loaded: asyncpg.Connection) -> None:
    await loaded.execute(
        "SELECT durable.pause_workflow_v1('q'), durable.pause_workflow_v1('other')"
    )
    got = await _claim_scans(db.dsn, ["q@x", "other@y"])
    assert got["row"] is None


async def test_flow_control_lookups_use_their_indexes(loaded: asyncpg.Connection) -> None:
    await loaded.execute(
        """
        INSERT INTO durable.runs (id, workflow, input, concurrency_key, concurrency, slot,
                                  singleton_key, debounce_key, limit_wait)
        SELECT 'f' || g, 'bounded', '{}', 'k' || (g % 1000), 2,
               CASE WHEN g % 3 = 0 THEN 'queued' ELSE 'held' END, 's' || g, 'd' || g,
               CASE WHEN g % 10 = 0 THEN 'lim' || chr(31) || (g % 100) END
        FROM generate_series(1, 20000) AS g;
        INSERT INTO durable.run_keys (kind, workflow, key, run_id)
        SELECT 'singleton', workflow, singleton_key, id FROM durable.runs
        WHERE workflow = 'bounded';
        ANALYZE durable.runs;
        ANALYZE durable.run_keys;
        """
    )
    # The queries of sql/functions.sql that find a key's slots, a singleton's run, a
    # debounce window's run and the next run waiting for a limit.
    checks = [
        (
            "runs_slot_idx",
            "SELECT count(*) FROM durable.runs WHERE workflow = 'bounded' "
            "AND concurrency_key = 'k7' AND slot = 'held' AND finished_at IS NULL",
        ),
        (
            "runs_slot_idx",
            "SELECT id FROM durable.runs r WHERE r.workflow = 'bounded' "
            "AND r.concurrency_key = 'k7' AND r.slot = 'queued' AND r.finished_at IS NULL "
            "ORDER BY r.priority DESC, r.created_at, r.id LIMIT 1",
        ),
        (
            # a singleton key's run (take_key_v1): run_keys, as runs is partitioned
            "run_keys_pkey",
            "SELECT run_id FROM durable.run_keys WHERE kind = 'singleton' "
            "AND workflow = 'bounded' AND key = 's7'",
        ),
        (
            "runs_debounce_idx",
            "SELECT id FROM durable.runs WHERE workflow = 'bounded' AND debounce_key = 'd7' "
            "AND status = 'pending' ORDER BY created_at DESC LIMIT 1",
        ),
        (
            "runs_limit_wait_idx",
            "SELECT id FROM durable.runs WHERE limit_wait = 'lim' || chr(31) || '7' "
            "AND wake_at > now() ORDER BY priority DESC, created_at, id LIMIT 1",
        ),
    ]
    for index, sql in checks:
        table = "run_keys" if index.startswith("run_keys") else "runs"
        scans = scans_of(await explain_query(loaded, sql), table)
        assert any(name == index for _, name in scans), (index, scans)
        assert ("Seq Scan", None) not in scans, (index, scans)


async def test_a_rate_limits_token_rows_are_not_all_read_by_each_attempt(db: Any) -> None:
    """limit_acquire_v1 finds the highest token row with an ordered read of one index entry:
    a `max()` planned while the table looked empty (as on a fresh install, before
    autovacuum analyzes it) read every row on every attempt, 3-5 ms at a high rate."""
    conn = await asyncpg.connect(db.dsn)
    acquire = "SELECT * FROM durable.limit_acquire_v1('r', 't', '', NULL, 1000000, 1.0, NULL, NULL)"
    try:
        await conn.execute("ANALYZE durable.limit_tokens")  # empty
        assert (await conn.fetchrow(acquire))["grow"] == "token"  # planned now
        await conn.execute(
            "INSERT INTO durable.limit_tokens (name, key, slot) "
            "SELECT 't', '', g FROM generate_series(0, 8191) AS g"
        )
        async with conn.transaction():
            row = await conn.fetchrow(acquire)
            read = await conn.fetchval(
                "SELECT pg_stat_get_xact_tuples_returned('durable.limit_tokens_pkey'::regclass)"
            )
            await conn.execute("ROLLBACK; BEGIN")  # the token taken is not kept
    finally:
        await conn.close()
    # A token was free, and taken.
    assert row["grow"] is None
    assert row["wake_at"] is None
    assert read < 100, f"{read} index entries of limit_tokens read by one attempt"
