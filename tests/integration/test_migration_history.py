"""Migration 0009 (partitioned history) on a database in use: a database at migration 0008,
holding runs of every status with their journal, attempts, mailbox, jobs, keys and a
schedule, keeps every row through the migration, and its runs go on afterwards."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, open_engine
from ulid import ULID

import durable
from durable.migrate import migrate
from durable.sql import functions_sql, migrations, render
from tests.integration.test_migrations import with_database
from tests.invariant import violations

TABLES = ("runs", "journal", "attempts", "signals", "jobs", "cancel_requests", "schedules")
THREE_MONTHS_AGO = datetime.now(UTC) - timedelta(days=92)


@dataclass(frozen=True)
class Db:
    dsn: str


@pytest.fixture
async def db_at_0008(server_dsn: str) -> AsyncIterator[Db]:
    """A database with migrations 0001 to 0008 applied, as the release before partitioned
    history left it. Its functions are this release's, which migrate() puts in place after
    0009 anyway (their bodies mention tables 0009 makes: not checked when created)."""
    name = f"m8_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(server_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("CREATE SCHEMA durable")
            for m in migrations()[:8]:
                await conn.execute(render(m.sql, "durable"))
                await conn.execute(
                    "INSERT INTO durable.migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
            await conn.execute("SET LOCAL check_function_bodies = off")
            await conn.execute(render(functions_sql(), "durable"))
    finally:
        await conn.close()
    yield Db(dsn)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def workflow() -> durable.Workflow:
    wf = durable.Workflow("order")

    async def work(ctx: durable.Context) -> Any:
        return {"done": ctx.input}

    wf.step("work", work)
    wf.wait_for_signal("approve", "go")
    return wf


def ids(wf: durable.Workflow) -> dict[str, str]:
    """The runs of the filled database, by role: ids of today, two of three months ago,
    and one that is no ULID (a run imported by hand), which no month covers."""
    old = ULID.from_datetime(THREE_MONTHS_AGO)
    return {
        "pending": str(ULID()),
        "running": str(ULID()),
        "cancelling": str(ULID()),
        "waiting": str(ULID()),
        "compensating": str(ULID()),
        "failed": str(ULID()),
        "completed": str(old),
        "cancelled": str(ULID.from_datetime(THREE_MONTHS_AGO + timedelta(seconds=1))),
        "child": str(ULID()),
        "imported": "zz-imported-by-hand-0000001",
    }


FILL = """
INSERT INTO durable.runs (id, workflow, queue, status, input, cursor, current_node,
                          waiting_for, error, ending, finished_at, idempotency_key,
                          singleton_key, parent_id, result)
VALUES
    (@pending, 'order', @queue, 'pending', '{"n": 1}', 0, 'work', NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL),
    (@running, 'order', @queue, 'running', '{"n": 2}', 0, 'work', NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL),
    (@cancelling, 'order', @queue, 'running', '{"n": 3}', 0, 'work', NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL),
    (@waiting, 'order', @queue, 'waiting', '{"n": 4}', 1, 'approve', 'go', NULL, NULL, NULL, NULL,
     'nightly', NULL, NULL),
    (@compensating, 'order', @queue, 'compensating', '{"n": 5}', 0, 'work', NULL, 'boom',
     'failed', NULL, NULL, NULL, NULL, NULL),
    (@failed, 'order', @queue, 'failed', '{"n": 6}', 0, NULL, NULL, 'boom', NULL, now(), NULL, NULL,
     NULL, NULL),
    (@completed, 'order', @queue, 'completed', '{"n": 7}', 2, NULL, NULL, NULL, NULL,
     now() - interval '80 days', 'order-7', NULL, NULL, '{"work": {"done": {"n": 7}}}'),
    (@cancelled, 'order', @queue, 'cancelled', '{"n": 8}', 0, NULL, NULL, 'cancelled', NULL,
     now() - interval '80 days', NULL, NULL, NULL, NULL),
    (@child, 'order', @queue, 'completed', '{"n": 9}', 2, NULL, NULL, NULL, NULL, now(), NULL,
     NULL, @completed, '{}'),
    (@imported, 'order', @queue, 'completed', '{"n": 10}', 2, NULL, NULL, NULL, NULL, now(), NULL,
     NULL, NULL, '{}');
INSERT INTO durable.journal (run_id, key, node, status, result, error, attempts)
VALUES (@waiting, 'work', 'work', 'completed', '{"done": 4}', NULL, 1),
       (@compensating, 'work', 'work', 'failed', NULL, 'boom', 3),
       (@failed, 'work', 'work', 'failed', NULL, 'boom', 3),
       (@completed, 'work', 'work', 'completed', '{"done": {"n": 7}}', NULL, 1),
       (@completed, 'approve', 'approve', 'completed', '{"ok": true}', NULL, 1),
       (@child, 'work', 'work', 'completed', '{}', NULL, 1),
       (@imported, 'work', 'work', 'completed', '{}', NULL, 1);
INSERT INTO durable.attempts (run_id, key, attempt, error)
VALUES (@compensating, 'work', 1, 'boom'), (@compensating, 'work', 2, 'boom'),
       (@failed, 'work', 1, 'boom'), (@failed, 'work', 2, 'boom'), (@completed, 'work', 1, 'flaky');
INSERT INTO durable.signals (run_id, name, payload, consumed_by, consumed_at, dedupe_key)
VALUES (@waiting, 'go', '{"ok": 4}', NULL, NULL, 'once'),
       (@completed, 'go', '{"ok": true}', 'approve', now() - interval '80 days', NULL),
       (@imported, 'go', '1', 'approve', now(), NULL);
INSERT INTO durable.cancel_requests (run_id, reason) VALUES (@cancelling, 'operator');
INSERT INTO durable.jobs (queue, task, run_id)
VALUES (@queue, 'advance', @pending), (@queue, 'advance', @running),
       (@queue, 'advance', @cancelling), (@queue, 'advance', @waiting),
       (@queue, 'compensate', @compensating);
INSERT INTO durable.schedules (name, workflow, cron, timezone, overlap, catch_up,
                               max_catch_up, next_at, last_run_id)
VALUES ('nightly', 'order', '0 3 * * *', 'UTC', 'skip', 'none', 1,
        now() + interval '1 day', @completed)
"""


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of the tables that hold runs and what refers to them, as JSON."""
    return {
        t: sorted(r[0] for r in await conn.fetch(f"SELECT to_jsonb(x)::text FROM durable.{t} x"))
        for t in TABLES
    }


async def test_0009_keeps_every_row_and_the_runs_go_on(db_at_0008: Db) -> None:
    wf = workflow()
    run = ids(wf)
    conn = await asyncpg.connect(db_at_0008.dsn)
    try:
        values = {**run, "queue": wf.queue}
        # @name stands for the run of that role (or the workflow's queue), as a literal.
        await conn.execute(re.sub(r"@(\w+)", lambda m: f"'{values[m[1]]}'", FILL))
        assert not await violations(db_at_0008.dsn)
        before = await snapshot(conn)
        max_seq = await conn.fetchval("SELECT max(seq) FROM durable.journal")
        max_signal = await conn.fetchval("SELECT max(id) FROM durable.signals")

        applied = await migrate(conn, "durable")
        assert applied[0] == 9  # and any later migration
        assert applied == list(range(9, applied[-1] + 1))

        assert await snapshot(conn) == before
        parts = dict(
            await conn.fetch(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'durable.runs'::regclass"
            )
        )
        now = datetime.now(UTC)
        nxt = (now.replace(day=1) + timedelta(days=32)).replace(day=1)
        # The old rows in one partition up to this month's end; the next month made ahead;
        # the id no ULID has in the default partition.
        assert set(parts) == {"runs_legacy", f"runs_y{nxt:%Y}m{nxt:%m}", "runs_default"}
        assert parts["runs_legacy"].startswith("FOR VALUES FROM (MINVALUE) TO (")
        where = dict(await conn.fetch("SELECT id, tableoid::regclass::text FROM durable.runs"))
        assert where.pop(run["imported"]) == "durable.runs_default"
        assert set(where.values()) == {"durable.runs_legacy"}
        assert (
            await conn.fetchval(
                "SELECT tableoid::regclass::text FROM durable.journal WHERE run_id = $1",
                run["imported"],
            )
            == "durable.journal_default"
        )
        # The keys moved to run_keys.
        assert sorted(map(tuple, await conn.fetch("SELECT * FROM durable.run_keys"))) == [
            ("idempotency", "order", "order-7", run["completed"]),
            ("singleton", "order", "nightly", run["waiting"]),
        ]
    finally:
        await conn.close()

    async with open_engine(db_at_0008, wf) as engine:
        # The keys held before hold on: an idempotency key of a run of three months ago, a
        # singleton key of a run still active.
        assert await engine.start(wf, {"n": 7}, idempotency_key="order-7") == run["completed"]
        assert await engine.start(wf, {"n": 4}, singleton_key="nightly") == run["waiting"]
        async with engine.worker(concurrency=4, poll_interval=0.05):
            # Every unfinished run finishes: the waiting one with the signal already in its
            # mailbox, the pending and crashed ones from their first node, the cancelled one
            # cancelled, the compensating one failed, the failed one once retried.
            assert await engine.wait(run["waiting"], timeout=20) == {
                "work": {"done": 4},
                "approve": {"ok": 4},
            }
            for role in ("pending", "running"):
                await eventually(lambda r=run[role]: _waiting_at_approve(engine, r), timeout=20)
                await engine.signal(run[role], "go", {"ok": role})
                assert (await engine.wait(run[role], timeout=20))["approve"] == {"ok": role}
            with pytest.raises(durable.RunCancelled):
                await engine.wait(run["cancelling"], timeout=20)
            with pytest.raises(durable.RunFailed):
                await engine.wait(run["compensating"], timeout=20)
            assert await engine.retry(run["failed"]) is True
            await eventually(lambda: _waiting_at_approve(engine, run["failed"]), timeout=20)
            assert await engine.signal(run["failed"], "go", 6) is True
            assert (await engine.wait(run["failed"], timeout=20))["work"] == {"done": {"n": 6}}
            # Its run finished, the singleton key is free again.
            assert await engine.start(wf, {"n": 11}, singleton_key="nightly") != run["waiting"]
        async with engine.pool.acquire() as c:
            # The sequences go on from where 0008 left them; the schedule keeps its run.
            assert await c.fetchval("SELECT min(seq) FROM durable.journal") <= max_seq
            assert await c.fetchval("SELECT max(seq) FROM durable.journal") > max_seq
            assert await c.fetchval("SELECT max(id) FROM durable.signals") > max_signal
            assert (
                await c.fetchval("SELECT last_run_id FROM durable.schedules") == (run["completed"])
            )
    assert not await violations(db_at_0008.dsn)


async def _waiting_at_approve(engine: durable.Engine, run_id: str) -> bool:
    return (await engine.get_run(run_id)).current_node == "approve"
