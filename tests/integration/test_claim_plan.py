"""The hot queries stay on their indexes when the tables are big (issue 6, scale scenario).

A fresh database gets ~50,000 jobs (most of them delayed, some due, in two queues) and
~100,000 finished runs spread over 30 days, then ANALYZE; we EXPLAIN the queries durable
runs with real parameters and look at the plan, not at timings (which would be flaky).
asyncpg sends the parameters with the statement, so PostgreSQL plans them as custom plans
for these values, as it does for the first executions in a worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from durable.sql import Queries

Q = Queries("durable")

JOBS = 50_000
DUE_JOBS = 2_500
RUNS = 100_000


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan tree, depth first."""
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> list[dict[str, Any]]:
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return list(plan_nodes(doc[0]["Plan"]))


def scans_of(nodes: list[dict[str, Any]], table: str) -> list[tuple[str, str | None]]:
    """(node type, index name) of every scan of `table` in the plan."""
    return [
        (n["Node Type"], n.get("Index Name"))
        for n in nodes
        if n.get("Relation Name") == table
        or (n["Node Type"] == "Bitmap Index Scan" and table in (n.get("Index Name") or ""))
    ]


def uses_index(nodes: list[dict[str, Any]], table: str, index: str) -> bool:
    return any(
        n["Node Type"] in ("Index Scan", "Index Only Scan")
        and n.get("Relation Name") == table
        and n.get("Index Name") == index
        for n in nodes
    )


@pytest.fixture
async def big(db: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db.dsn)
    # Jobs: 47,500 delayed up to ~13 hours ahead and 2,500 due, 80 % in queue 'q'.
    await conn.execute(
        """
        INSERT INTO durable.jobs (queue, task, run_id, payload, run_at)
        SELECT CASE WHEN g % 5 = 0 THEN 'other' ELSE 'q' END, 'advance', NULL,
               '{"c": 0, "a": 1}'::jsonb,
               CASE WHEN g <= $2 THEN now() - g * interval '1 millisecond'
                    ELSE now() + g * interval '1 second' END
        FROM generate_series(1, $1) AS g
        """,
        JOBS,
        DUE_JOBS,
    )
    # Finished runs over the last 30 days: 97 % completed, 2 % failed, 1 % cancelled.
    await conn.execute(
        """
        INSERT INTO durable.runs
            (id, workflow, status, input, cursor, created_at, updated_at, finished_at)
        SELECT lpad(g::text, 26, '0'), 'order',
               CASE WHEN g % 100 < 2 THEN 'failed' WHEN g % 100 = 2 THEN 'cancelled'
                    ELSE 'completed' END,
               '{}'::jsonb, 1, t, t, t
        FROM generate_series(1, $1) AS g,
             LATERAL (SELECT now() - ($1 - g) * (interval '30 days' / $1)) AS x(t)
        """,
        RUNS,
    )
    await conn.execute("ANALYZE durable.jobs")
    await conn.execute("ANALYZE durable.runs")
    yield conn
    await conn.close()


async def test_claim_walks_the_ready_index(big: asyncpg.Connection) -> None:
    nodes = await explain(big, Q["claim_job"], ["q"])
    scans = scans_of(nodes, "jobs")
    # The claim must walk jobs_ready_idx in (priority, run_at) order and stop at the first
    # due, unlocked job of its queues; a Seq Scan would read every delayed job every time.
    assert uses_index(nodes, "jobs", "jobs_ready_idx"), scans
    assert ("Seq Scan", None) not in scans, scans


async def test_list_runs_by_a_rare_status_uses_the_status_index(big: asyncpg.Connection) -> None:
    # 2 % of runs failed: (status, id DESC) hands over the newest 50 directly. We do not
    # assert an index for status='completed' (97 % of rows): walking the primary key
    # backwards and filtering is just as good there and the planner may rightly pick it.
    nodes = await explain(big, Q["list_runs"], "failed", None, 50, None, None, None, None)
    assert uses_index(nodes, "runs", "runs_status_idx"), scans_of(nodes, "runs")
    assert ("Seq Scan", None) not in scans_of(nodes, "runs")


async def test_purge_of_old_runs_uses_the_finished_index(big: asyncpg.Connection) -> None:
    # Runs older than 29 days are ~3 % of the table and purge takes the oldest first in
    # batches: runs_finished_idx gives them in order. We do not assert it for a cut-off
    # that matches most of the table (e.g. older than one day), where a sequential scan
    # can be the cheaper plan for the planner and harmless in a batch job.
    nodes = await explain(big, Q["purge_candidates"], 29 * 86400.0, 1000)
    assert uses_index(nodes, "runs", "runs_finished_idx"), scans_of(nodes, "runs")


async def test_purge_does_not_scan_the_whole_runs_table(big: asyncpg.Connection) -> None:
    # The parent check only needs the runs that have a parent (runs_parent_idx) or a
    # lookup of the parent by primary key; a full scan per batch makes purging N runs
    # cost O(N^2 / batch_size).
    nodes = await explain(big, Q["purge_candidates"], 29 * 86400.0, 1000)
    assert ("Seq Scan", None) not in scans_of(nodes, "runs"), scans_of(nodes, "runs")
