"""Claims never read history (issue 17): with months of finished runs in their own
partitions, every statement of a claim (`claim_v1`, `run_results_v1`, `relock_v1`) reads
only the partitions of the claimed run's month, and no partition of another month. The
old months hold 20,000 finished runs each, with their journal and failed attempts.

Checked two ways: EXPLAIN ANALYZE of each statement as the function holds it
(tests/integration/plans.py), in a custom plan, which prunes the other months as it is
made, and in the generic plan the functions use, which prunes them as it runs; and the
per-partition scan counts of the real calls (pg_stat_xact_user_tables).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from plans import MODES, explain_analyze, function_statements
from test_claim_plan import JOB_FIELDS, SERVED, claim_row, values_of

from durable.sql import Queries
from tests.invariant import violations

Q = Queries("durable")
OLD_MONTHS = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
FINISHED = 20_000  # per old month
HISTORY = ("runs", "journal", "attempts", "signals")

# Old months: finished runs with four journal rows each, two failed attempts every third,
# a consumed signal. This month (the real clock's, as the run ids): running runs with a due
# advance job each (a tenth retrying), parallel runs with a job per branch.
FILL = """
INSERT INTO durable.runs (id, workflow, queue, status, input, result, cursor,
                          created_at, updated_at, finished_at)
SELECT durable.ulid_prefix_v1(t.at) || lpad(g::text, 16, '0'), 'order', 'order@a',
       'completed', '{}', '{}', 4, t.at, t.at, t.at
FROM generate_series(1, $2) AS g,
     LATERAL (SELECT $1::timestamptz + g * interval '1 second') AS t (at);
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT r.id, k, k, 'completed', '{"ok": true}'
FROM durable.runs r, unnest(ARRAY['reserve', 'charge', 'ship', 'notify']) AS k
WHERE r.id >= durable.ulid_prefix_v1($1::timestamptz)
  AND r.id < durable.ulid_prefix_v1($1::timestamptz + interval '1 month');
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT r.id, 'charge', a, 'card declined' FROM durable.runs r, generate_series(1, 2) AS a
WHERE r.id >= durable.ulid_prefix_v1($1::timestamptz)
  AND r.id < durable.ulid_prefix_v1($1::timestamptz + interval '1 month')
  AND right(r.id, 1) IN ('0', '3', '6', '9');
INSERT INTO durable.signals (run_id, name, payload, consumed_by, consumed_at)
SELECT r.id, 'go', '1', 'ship', r.finished_at FROM durable.runs r
WHERE r.id >= durable.ulid_prefix_v1($1::timestamptz)
  AND r.id < durable.ulid_prefix_v1($1::timestamptz + interval '1 month')
"""

LIVE = """
INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node, attempt)
SELECT durable.ulid_prefix_v1(now()) || 'R' || lpad(g::text, 15, '0'), 'order', 'order@a',
       'running', '{}', 1, 'charge', 1 + (g % 10 = 0)::integer
FROM generate_series(1, 1000) AS g;
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT id, 'reserve', 'reserve', 'completed', '{"ok": true}' FROM durable.runs
WHERE status = 'running';
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT id, 'charge', 1, 'timeout' FROM durable.runs WHERE status = 'running' AND attempt = 2;
INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node, branches)
SELECT durable.ulid_prefix_v1(now()) || 'P' || lpad(g::text, 15, '0'), 'refund', 'refund@b',
       'running', '{}', 1, 'notify', ARRAY['email', 'sms']
FROM generate_series(1, 200) AS g;
INSERT INTO durable.jobs (queue, task, run_id, run_at)
SELECT queue, 'advance', id, now() - interval '5 seconds' FROM durable.runs
WHERE status = 'running' AND branches IS NULL;
INSERT INTO durable.jobs (queue, task, run_id, branch, run_at)
SELECT r.queue, 'branch', r.id, b, now() - interval '1 second'
FROM durable.runs r, unnest(r.branches) AS b WHERE r.status = 'running';
"""


@pytest.fixture(scope="module")
async def history_db(server_dsn: str, durable_template: str) -> AsyncIterator[asyncpg.Connection]:
    """A database of its own, filled once for this module's tests (every claim is rolled
    back), checked against the global invariant and dropped after."""
    name = f"t_hist_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{durable_template}"')
    finally:
        await admin.close()
    dsn = urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
    conn = await asyncpg.connect(dsn)
    for month in OLD_MONTHS:
        await conn.execute("SELECT durable.ensure_partitions_v1($1, 0)", month)
        for statement in FILL.split(";\n"):
            args = (month, FINISHED) if "generate_series(1, $2)" in statement else (month,)
            await conn.execute(statement, *args)
    await conn.execute(LIVE)
    await conn.execute("ANALYZE")
    try:
        yield conn
    finally:
        await conn.close()
        broken = await violations(dsn)
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    assert not broken, "invariant broken:\n" + "\n".join(broken)


def this_month() -> str:
    now = datetime.now(UTC)
    return f"y{now:%Y}m{now:%m}"


def history_partitions_read(nodes: list[dict[str, Any]]) -> set[str]:
    """The partitions of history tables that scans of the plan read (ran at least once)."""
    return {
        n["Partition Name"]
        for n in nodes
        if "Partition Name" in n
        and n.get("Relation Name") in HISTORY
        and n.get("Actual Loops", 0) > 0
    }


def history_partitions_planned(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Partition Name"] for n in nodes if "Partition Name" in n}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", ["advance", "branch"])
async def test_no_statement_of_a_claim_reads_a_partition_of_another_month(
    history_db: asyncpg.Connection, mode: str, task: str
) -> None:
    conn = history_db
    if task == "advance":
        job = await claim_row(conn, Q["claim"], SERVED)
    else:
        branch_job = await conn.fetchval(
            "SELECT id FROM durable.jobs WHERE task = 'branch' AND branch = 'sms' LIMIT 1"
        )
        job = await claim_row(conn, Q["claim_by_id"], branch_job, True)
    assert job["task"] == task
    values = await values_of(conn, job)
    values["p_run"] = job["run_id"]
    statements = await function_statements(conn, "durable", "claim_v1", JOB_FIELDS)
    statements += await function_statements(conn, "durable", "run_results_v1", {})
    if task == "advance":
        statements += await function_statements(conn, "durable", "relock_v1", {})
        values.update(
            p_written_by=await conn.fetchval(
                "SELECT xmin FROM durable.runs WHERE id = $1", job["run_id"]
            ),
            v_run=job["run_id"],
        )
    own = {f"{t}_{this_month()}" for t in HISTORY}
    old = {f"{t}_y{m:%Y}m{m:%m}" for t in HISTORY for m in OLD_MONTHS}
    read_any = set()
    for statement in statements:
        nodes = await explain_analyze(conn, statement, mode, values)
        read = history_partitions_read(nodes)
        assert read <= own, (statement.sql, read)
        read_any |= read
        # Keyed by the run id it is given, not by a row it joins: the other months are not
        # even opened (pruned as the plan is made, or as it starts), which costs a lock and
        # an index open per partition on every call.
        assert not history_partitions_planned(nodes) & old, (statement.sql, mode)
    # And the claim does read its run, in this month's partition.
    assert f"runs_{this_month()}" in read_any
    assert f"journal_{this_month()}" in read_any


RUN_FIELDS = {
    "r": {
        "queue": "text",
        "priority": "smallint",
        "waiting_for": "text",
        "child_id": "text",
        "current_node": "text",
        "branches": "text[]",
        "paused": "boolean",
    }
}


@pytest.mark.parametrize("mode", MODES)
async def test_no_statement_of_a_step_opens_a_partition_of_another_month(
    history_db: asyncpg.Connection, mode: str
) -> None:
    """The statements of the step path, each as it runs: a node's commit
    (`complete_node_v2`), the run's jobs (`ensure_jobs_v1`), a run's end (`finished_v1`,
    which looks for a parent waiting for it). Each opens this month's partitions only."""
    conn = history_db
    run = await conn.fetchrow(
        "SELECT id, queue, priority FROM durable.runs WHERE status = 'running' "
        "AND branches IS NULL ORDER BY id LIMIT 1"
    )
    now = await conn.fetchval("SELECT now()")
    values: dict[str, Any] = {
        "p_run": run["id"],
        "p_node": "charge",
        "p_result": "null",
        "p_attempts": 1,
        "p_started": now,
        "p_replay": False,
        "p_cursor": 2,
        "p_next": "ship",
        "p_consume": None,
        "p_job": None,
        "v_now": now,
        "v_paused": False,
        "v_parent": None,
        "v_queue": run["queue"],
        "v_priority": run["priority"],
        "v_singleton": None,
        "v_workflow": "order",
        "v_slot_key": None,
        "v_open": None,
        "v_job": None,
        "v_run_at": None,
        "v_task": "advance",
        "v_due": now,
        "r.queue": run["queue"],
        "r.priority": run["priority"],
        "r.waiting_for": None,
        "r.child_id": None,
        "r.current_node": "charge",
        "r.branches": None,
        "r.paused": False,
    }
    statements = []
    for function in ("complete_node_v2", "ensure_jobs_v1", "finished_v1"):
        statements += [
            st
            for st in await function_statements(conn, "durable", function, RUN_FIELDS)
            if re.search(r'"durable"\.(runs|journal|attempts|signals)\b', st.sql)
        ]
    assert len(statements) >= 8, [st.sql for st in statements]
    old = {f"{t}_y{m:%Y}m{m:%m}" for t in HISTORY for m in OLD_MONTHS}
    for statement in statements:
        nodes = await explain_analyze(conn, statement, mode, values)
        assert not history_partitions_planned(nodes) & old, (statement.sql, mode)


CALLS = {
    "due": (Q["claim"], lambda ids: (SERVED,)),
    "branch": (Q["claim_by_id"], lambda ids: (ids["branch"], True)),
    "relock": (
        "SELECT durable.relock_v1($1, $2::text::xid)",
        lambda ids: (ids["advance"], ids["written_by"]),
    ),
}


@pytest.mark.parametrize("call", CALLS)
async def test_a_claim_scans_only_the_partitions_of_its_runs_month(
    history_db: asyncpg.Connection, call: str
) -> None:
    """The real call, eight times in one session (generic plans, made at the first):
    the scans PostgreSQL counted in each transaction, by partition."""
    conn = history_db
    ids = dict(
        await conn.fetchrow(
            """
            SELECT (SELECT j.id FROM durable.jobs j WHERE j.task = 'advance' ORDER BY j.id
                      LIMIT 1) AS advance,
                   (SELECT r.xmin::text FROM durable.jobs j JOIN durable.runs r
                      ON r.id = j.run_id WHERE j.task = 'advance' ORDER BY j.id LIMIT 1)
                       AS written_by,
                   (SELECT id FROM durable.jobs WHERE task = 'branch' ORDER BY id LIMIT 1)
                       AS branch
            """
        )
    )
    sql, args = CALLS[call]
    own = {f"{t}_{this_month()}" for t in HISTORY}
    # The counts of scans not yet sent to the statistics (those of earlier transactions
    # too, until the backend flushes them): read before and after the call.
    counts = """
        SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n
        FROM pg_stat_xact_user_tables WHERE schemaname = 'durable'
    """
    for _ in range(8):
        tx = conn.transaction()
        await tx.start()
        try:
            before = dict(await conn.fetch(counts))
            await conn.fetch(sql, *args(ids))
            after = dict(await conn.fetch(counts))
        finally:
            await tx.rollback()
        scanned = {t for t, n in after.items() if n > before.get(t, 0)}
        history = {t for t in scanned if t.split("_")[0] in HISTORY}
        assert history <= own, history
        assert f"runs_{this_month()}" in history
