"""The hot queries stay on their indexes when the tables are big (issue 6, scale scenario;
issue 11: the real claim).

The workflow engine claims with `claim_v1` (sql/functions.sql), and re-locks a run it
continues with `relock_v1`: PL/pgSQL functions whose statements EXPLAIN of the call does
not show: tests/integration/plans.py takes them out of the function as the database
holds it and explains each, with the values of a real claim (custom plan) and as the
generic plan the functions use (SET plan_cache_mode). Independently of how the function
is written, a claim's buffer count (nested statements included) must stay
far below the size of any table it reads: a sequential scan cannot hide there.

The plain job queue (`durable.queue`, used by a bare `durable.worker.Worker`) claims with
the `claim_job` query instead; its plan is checked on the `big` fixture, with the client's
listing and purge queries. We look at plans and buffers, not timings (which would be flaky).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from plans import (
    MODES,
    buffers_of_call,
    explain,
    explain_query,
    function_statements,
    scans_of,
    seq_scans,
    uses_index,
)

from durable.sql import Queries
from tests.invariant import violations

Q = Queries("durable")

JOBS = 50_000
DUE_JOBS = 2_500
RUNS = 100_000


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


async def test_the_plain_queue_claim_walks_the_ready_index(big: asyncpg.Connection) -> None:
    """`claim_job`, the claim of `durable.queue` (not the workflow engine's: see below)."""
    nodes = await explain_query(big, Q["claim_job"], ["q"])
    scans = scans_of(nodes, "jobs")
    # The claim must walk jobs_ready_idx in (priority, run_at) order and stop at the first
    # due, unlocked job of its queues; a Seq Scan would read every delayed job every time.
    assert uses_index(nodes, "jobs", "jobs_ready_idx"), scans
    assert ("Seq Scan", None) not in scans, scans


async def test_list_runs_by_a_rare_status_uses_the_status_index(big: asyncpg.Connection) -> None:
    # 2 % of runs failed: (status, id DESC) hands over the newest 50 directly. We do not
    # assert an index for status='completed' (97 % of rows): walking the primary key
    # backwards and filtering is just as good there and the planner may rightly pick it.
    nodes = await explain_query(
        big, Q["list_runs"], "failed", None, 50, None, None, None, None, None
    )
    assert uses_index(nodes, "runs", "runs_status_idx"), scans_of(nodes, "runs")
    assert ("Seq Scan", None) not in scans_of(nodes, "runs")


async def test_purge_of_old_runs_uses_the_finished_index(big: asyncpg.Connection) -> None:
    # Runs older than 29 days are ~3 % of the table and purge takes the oldest first in
    # batches: runs_finished_idx gives them in order. We do not assert it for a cut-off
    # that matches most of the table (e.g. older than one day), where a sequential scan
    # can be the cheaper plan for the planner and harmless in a batch job.
    nodes = await explain_query(big, Q["purge_candidates"], 29 * 86400.0, 1000)
    assert uses_index(nodes, "runs", "runs_finished_idx"), scans_of(nodes, "runs")


async def test_purge_does_not_scan_the_whole_runs_table(big: asyncpg.Connection) -> None:
    # The parent check only needs the runs that have a parent (runs_parent_idx) or a
    # lookup of the parent by primary key; a full scan per batch makes purging N runs
    # cost O(N^2 / batch_size).
    nodes = await explain_query(big, Q["purge_candidates"], 29 * 86400.0, 1000)
    assert ("Seq Scan", None) not in scans_of(nodes, "runs"), scans_of(nodes, "runs")


# -- the workflow engine's claim -----------------------------------------------------------

SERVED = ["order@a", "refund@b"]  # the queues the claiming worker serves
TABLES = ("jobs", "runs", "journal", "attempts")  # the tables that grow with use
# cancel_requests is left out: it holds a row per cancel in progress only, so a scan of its
# page or two is what the planner should pick.

JOB_FIELDS = {
    "j": {
        "id": "bigint",
        "queue": "text",
        "task": "text",
        "branch": "text",
        "run_id": "text",
        "lease_token": "uuid",
    }
}

# A database after some weeks of use, in the state the engine leaves it (the global
# invariant holds): finished runs with their journal and failed attempts; sleeping runs
# with a delayed job each (a tenth of an old shape no worker serves any more); running runs
# with a due job, some retrying, some being cancelled, a tenth in a queue this worker does
# not serve; runs fanned out to two branches, each with a branch job; leased steps.
ENGINE_FILL = """
INSERT INTO durable.runs (id, workflow, queue, status, input, result, cursor,
                          created_at, updated_at, finished_at)
SELECT 'f' || lpad(g::text, 25, '0'), 'order', 'order@a', 'completed', '{"sku": "A1"}',
       '{}', 4, t, t, t
FROM generate_series(1, {finished}) g, LATERAL (SELECT now() - g * interval '1 minute') x(t);
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT 'f' || lpad(g::text, 25, '0'), k, k, 'completed', '{"ok": true}'
FROM generate_series(1, {finished}) g, unnest(ARRAY['reserve', 'charge', 'ship', 'notify']) k;
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT 'f' || lpad(g::text, 25, '0'), 'charge', a, 'card declined'
FROM generate_series(1, {finished}) g, generate_series(1, 2) a WHERE g % 3 = 0;

INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node, wake_at)
SELECT 's' || lpad(g::text, 25, '0'), 'order',
       CASE WHEN g % 10 = 0 THEN 'order@old' ELSE 'order@a' END, 'waiting', '{}', 2,
       'cool_off', now() + g * interval '1 second'
FROM generate_series(1, {sleeping}) g;
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT 's' || lpad(g::text, 25, '0'), k, k, 'completed', '{"ok": true}'
FROM generate_series(1, {sleeping}) g, unnest(ARRAY['reserve', 'charge']) k;

INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node, attempt)
SELECT 'r' || lpad(g::text, 25, '0'), 'order',
       CASE WHEN g % 10 = 0 THEN 'other@c' ELSE 'order@a' END, 'running', '{}', 1, 'charge',
       1 + g % 3
FROM generate_series(1, {running}) g;
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT 'r' || lpad(g::text, 25, '0'), 'reserve', 'reserve', 'completed', '{"ok": true}'
FROM generate_series(1, {running}) g;
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT r.id, 'charge', a, 'timeout' FROM durable.runs r, generate_series(1, 2) a
WHERE r.status = 'running' AND a < r.attempt;
INSERT INTO durable.cancel_requests (run_id)
SELECT id FROM durable.runs WHERE status = 'running' AND id LIKE '%37';

INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node, branches)
SELECT 'p' || lpad(g::text, 25, '0'), 'refund', 'refund@b', 'running', '{}', 1, 'notify',
       ARRAY['email', 'sms']
FROM generate_series(1, {parallel}) g;
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT 'p' || lpad(g::text, 25, '0'), 'notify#sms', 1, 'smtp down'
FROM generate_series(1, {parallel}) g WHERE g % 2 = 0;

INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node)
SELECT 'l' || lpad(g::text, 25, '0'), 'order', 'order@a', 'running', '{}', 3, 'ship'
FROM generate_series(1, {leased}) g;

INSERT INTO durable.jobs (queue, task, run_id, run_at)
SELECT r.queue, 'advance', r.id, r.wake_at FROM durable.runs r WHERE r.status = 'waiting';
INSERT INTO durable.jobs (queue, task, run_id, run_at)
SELECT r.queue, 'advance', r.id, now() - interval '5 seconds' - random() * interval '5 seconds'
FROM durable.runs r WHERE r.id LIKE 'r%';
INSERT INTO durable.jobs (queue, task, run_id, branch, run_at)
SELECT r.queue, 'branch', r.id, b, now() - random() * interval '5 seconds'
FROM durable.runs r, unnest(r.branches) b WHERE r.id LIKE 'p%';
INSERT INTO durable.jobs (queue, task, run_id, run_at, lease_token)
SELECT r.queue, 'advance', r.id, now() + interval '30 seconds', gen_random_uuid()
FROM durable.runs r WHERE r.id LIKE 'l%';
"""

FILL_SIZES = {
    "finished": 20_000,
    "sleeping": 12_000,
    "running": 1_500,
    "parallel": 300,
    "leased": 50,
}

#: Buffers one claim may touch once the session's plans are made: a handful of index pages
#: and heap pages per statement. Every table the claim reads is made 4 times bigger.
CLAIM_BUFFERS = 64


@pytest.fixture(scope="module")
async def engine_db(server_dsn: str, durable_template: str) -> AsyncIterator[asyncpg.Connection]:
    """A database of its own, filled once for this module's tests (they change nothing:
    every claim is rolled back), checked against the global invariant and dropped after."""
    name = f"t_plan_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{durable_template}"')
    finally:
        await admin.close()
    dsn = urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
    conn = await asyncpg.connect(dsn)
    sql = ENGINE_FILL
    for key, n in FILL_SIZES.items():
        sql = sql.replace("{" + key + "}", str(n))
    await conn.execute(sql)
    await conn.execute("ANALYZE")
    # A partitioned table's pages are its partitions' (history tables: sql/schema.sql).
    pages = dict(
        await conn.fetch(
            """
            SELECT coalesce(p.relname, c.relname) AS name, sum(c.relpages)::bigint
            FROM pg_class c
            LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
            LEFT JOIN pg_class p ON p.oid = i.inhparent
            WHERE c.relnamespace = 'durable'::regnamespace AND c.relkind = 'r'
              AND coalesce(p.relname, c.relname) = ANY($1::text[])
            GROUP BY 1
            """,
            list(TABLES),
        )
    )
    try:
        # A sequential scan of any of them would cost more than a claim may.
        assert all(pages[t] >= 4 * CLAIM_BUFFERS for t in TABLES if t != "attempts"), pages
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


async def claim_row(conn: asyncpg.Connection, sql: str, *args: Any) -> asyncpg.Record:
    """What a claim returns, in a transaction rolled back afterwards."""
    tx = conn.transaction()
    await tx.start()
    try:
        row = await conn.fetchrow(sql, *args)
    finally:
        await tx.rollback()
    assert row is not None, "the claim found no job"
    return row


async def values_of(conn: asyncpg.Connection, job: asyncpg.Record) -> dict[str, Any]:
    """The variables of claim_v1 when it claims `job` (a claim's result row)."""
    return {
        "p_queues": SERVED,
        "p_job": job["id"],
        "p_token": None,
        "p_results": True,
        "v_now": await conn.fetchval("SELECT now()"),
        "v_suspicious": False,
        **{f"j.{f}": job[f] for f in JOB_FIELDS["j"]},
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", ["advance", "branch"])
async def test_every_statement_of_the_engine_claim_stays_on_indexes(
    engine_db: asyncpg.Connection, mode: str, task: str
) -> None:
    """Issue 11: the plan of each statement of `claim_v1`, of `run_results_v1` (which it
    calls) and of `relock_v1` (the claim of a run continued on its worker), custom and
    generic: the due-job cursor walks `jobs_ready_idx`; nothing reads jobs, runs, journal
    or attempts sequentially."""
    conn = engine_db
    if mode == "generic" and await conn.fetchval("SHOW server_version_num") < "160000":
        pytest.skip("EXPLAIN (GENERIC_PLAN) needs PostgreSQL 16")
    if task == "advance":
        job = await claim_row(conn, Q["claim"], SERVED)  # the advance jobs are due first
    else:
        branch_job = await conn.fetchval(
            "SELECT id FROM durable.jobs WHERE task = 'branch' AND branch = 'sms' LIMIT 1"
        )
        job = await claim_row(conn, Q["claim_by_id"], branch_job, True)
    assert job["task"] == task
    values = await values_of(conn, job)
    statements = await function_statements(conn, "durable", "claim_v1", JOB_FIELDS)
    cursors = [s for s in statements if s.cursor]
    # The due-job cursor, the claim by id, the lease holder's claim, the run's lock, the
    # read of the run: if claim_v1 is rewritten, this test must be looked at again.
    assert len(cursors) == 1, [s.sql for s in statements]
    assert len(statements) >= 5, [s.sql for s in statements]
    statements += await function_statements(conn, "durable", "run_results_v1", {})
    values["p_run"] = job["run_id"]
    if task == "advance":  # a worker continuing the run on its slot re-locks it instead
        statements += await function_statements(conn, "durable", "relock_v1", {})
        values.update(
            p_written_by=await conn.fetchval(
                "SELECT xmin FROM durable.runs WHERE id = $1", job["run_id"]
            ),
            v_run=job["run_id"],
        )
    for statement in statements:
        nodes = await explain(conn, statement, mode, values)
        assert not seq_scans(nodes, TABLES), (statement.sql, [n["Node Type"] for n in nodes])
        if statement.cursor:
            assert uses_index(nodes, "jobs", "jobs_ready_idx"), scans_of(nodes, "jobs")


CLAIMS = {
    "due": (Q["claim"], lambda ids: (SERVED,)),
    "relock": (
        "SELECT durable.relock_v1($1, $2::text::xid)",
        lambda ids: (ids["advance"], ids["written_by"]),
    ),
    "follow": (Q["claim_by_id"], lambda ids: (ids["advance"], False)),
    "branch": (Q["claim_by_id"], lambda ids: (ids["branch"], True)),
    "leased": (Q["claim_leased"], lambda ids: (ids["leased"], ids["token"])),
}


@pytest.mark.parametrize("claim", CLAIMS)
async def test_a_claim_touches_a_few_pages_not_a_table(
    engine_db: asyncpg.Connection, claim: str
) -> None:
    """Issue 11: however `claim_v1` is written, a claim reads a few dozen buffers
    (EXPLAIN ANALYZE of the call counts those of its nested statements), on tables four
    times bigger than that. A sequential scan, or a walk over many rows, cannot stay under
    the bound."""
    conn = engine_db
    ids = dict(
        await conn.fetchrow(
            """
            SELECT (SELECT id FROM durable.jobs WHERE task = 'advance' AND run_id LIKE 'r%'
                      ORDER BY id LIMIT 1) AS advance,
                   (SELECT r.xmin::text FROM durable.jobs j JOIN durable.runs r
                      ON r.id = j.run_id WHERE j.task = 'advance' AND j.run_id LIKE 'r%'
                      ORDER BY j.id LIMIT 1) AS written_by,
                   (SELECT id FROM durable.jobs WHERE task = 'branch' ORDER BY id LIMIT 1)
                       AS branch,
                   (SELECT id FROM durable.jobs WHERE lease_token IS NOT NULL ORDER BY id
                      LIMIT 1) AS leased,
                   (SELECT lease_token FROM durable.jobs WHERE lease_token IS NOT NULL
                      ORDER BY id LIMIT 1) AS token
            """
        )
    )
    sql, args = CLAIMS[claim]
    await claim_row(conn, sql, *args(ids))  # it does claim a job
    # The first two calls of a session also read the catalog to plan (the functions use
    # generic plans from their first call: SET plan_cache_mode in sql/functions.sql).
    counts = [await buffers_of_call(conn, sql, *args(ids)) for _ in range(10)]
    assert max(counts[2:]) <= CLAIM_BUFFERS, counts


@pytest.mark.xfail(
    strict=True,
    reason="known gap (issue 11 finding): claim_v1 walks jobs_ready_idx in (priority, "
    "run_at) order and filters on the queue, so every due job of a queue the worker does not "
    "serve (runs of an old shape, another service's workflows) is read again by every claim",
)
async def test_due_jobs_of_queues_a_worker_does_not_serve_do_not_slow_its_claims(
    engine_db: asyncpg.Connection,
) -> None:
    conn = engine_db
    tx = conn.transaction()  # the module's database is shared: undone at the end
    await tx.start()
    try:
        # The sleeping runs of the old shape are due now, older than every served job: runs
        # of a shape no running worker serves, waiting for one (docs/guides/deploying.md).
        await conn.execute(
            """
            UPDATE durable.runs SET wake_at = now() - interval '1 hour'
            WHERE queue = 'order@old';
            UPDATE durable.jobs SET run_at = now() - interval '1 hour'
            WHERE queue = 'order@old';
            ANALYZE durable.jobs;
            """
        )
        due = await conn.fetchval(
            "SELECT count(*) FROM durable.jobs WHERE queue = 'order@old' AND run_at <= now()"
        )
        assert due == FILL_SIZES["sleeping"] // 10
        counts = [await buffers_of_call(conn, Q["claim"], SERVED) for _ in range(10)]
    finally:
        await tx.rollback()
    assert max(counts[2:]) <= CLAIM_BUFFERS, counts


@pytest.mark.parametrize(
    ("query", "args"),
    [
        ("check_runs", (["order@a710b1f16c22"],)),
        ("unserved_runs", (["order"], ["order@a710b1f16c22"])),
        ("upgrade_candidates", ("order", 1, "order@v2@f76e5ef02475")),
    ],
)
async def test_check_upgrade_and_the_worker_start_read_only_unfinished_runs(
    big: asyncpg.Connection, query: str, args: tuple[Any, ...]
) -> None:
    # 100,000 finished runs and none unfinished: the status index finds the unfinished
    # ones without reading the finished (a deploy gate must not scan the run history).
    nodes = await explain_query(big, Q[query], *args)
    scans = scans_of(nodes, "runs")
    assert scans, nodes
    assert ("Seq Scan", None) not in scans, scans
