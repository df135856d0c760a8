"""Schema and migrations (durable/migrate.py, sql/schema.sql, sql/migrations/)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from durable.errors import ConfigurationError
from durable.migrate import migrate
from durable.queue import JobQueue
from durable.sql import Queries, functions_sql, migrations, render, schema_sql, validate_schema
from durable.worker import Worker

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"migrations", "runs", "journal", "attempts", "signals", "jobs"}


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database (not cloned from the migrated template)."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(server_dsn, name)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def poll(check: Any, *, timeout: float, interval: float = 0.02) -> None:
    """Wait until `check()` is true, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - polling a database / process
            await anyio.sleep(interval)


def spawn_migrator(dsn: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", MIGRATE_SCRIPT, dsn],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def tables(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {r[0] for r in rows}


# -- concurrent migration from two processes -----------------------------------------------

GATE = 7_340_001
MIGRATE_SCRIPT = f"""
import asyncio, json, sys
import asyncpg
from durable.migrate import migrate

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    try:
        # Wait at the gate the test holds, so both processes migrate at the same moment.
        await conn.execute("SELECT pg_advisory_lock_shared({GATE})")
        applied = await migrate(conn, "durable")
    finally:
        await conn.close()
    print(json.dumps(applied))

asyncio.run(main())
"""


async def test_two_processes_migrating_a_fresh_database_at_once_apply_it_once(
    empty_dsn: str,
) -> None:
    gate = await asyncpg.connect(empty_dsn)
    procs: list[subprocess.Popen[str]] = []
    try:
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        procs.extend(spawn_migrator(empty_dsn) for _ in range(2))

        async def both_at_the_gate() -> bool:
            for proc in procs:
                assert proc.poll() is None, proc.communicate()
            waiting: int = await gate.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND objid = $1 AND NOT granted",
                GATE,
            )
            return waiting == 2

        await poll(both_at_the_gate, timeout=30)
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")

        outputs = []
        for proc in procs:
            await poll(lambda p=proc: _true(p.poll() is not None), timeout=30)
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))

        every = [m.version for m in migrations()]
        assert sorted(outputs, key=len) == [[], every], "exactly one process applies"
        rows = await gate.fetch("SELECT version, name FROM durable.migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations()
        ]
        assert await tables(gate, "durable") >= TABLES
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        await gate.close()


# -- migrate() is idempotent ---------------------------------------------------------------


async def test_migrate_applies_everything_once_then_nothing(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        every = [m.version for m in migrations()]
        assert every, "there is at least one migration"
        assert await migrate(conn, "durable") == every
        assert await migrate(conn, "durable") == []
        assert await conn.fetchval("SELECT count(*) FROM durable.migrations") == len(every)
        assert await tables(conn, "durable") >= TABLES
    finally:
        await conn.close()


async def test_migrate_on_the_migrated_template_applies_nothing(db: Any) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        before = await conn.fetchval("SELECT count(*) FROM durable.migrations")
        assert await migrate(conn, "durable") == []
        assert await conn.fetchval("SELECT count(*) FROM durable.migrations") == before
    finally:
        await conn.close()


async def test_a_migration_that_fails_leaves_the_database_untouched(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        # A table in the way makes schema.sql fail half-way: nothing of it may remain.
        await conn.execute("CREATE SCHEMA durable; CREATE TABLE durable.jobs (x int)")
        with pytest.raises(asyncpg.DuplicateTableError):
            await migrate(conn, "durable")
        assert await tables(conn, "durable") == {"jobs"}
    finally:
        await conn.close()


# -- schema.sql equals the migrations applied in order -------------------------------------


CATALOG: dict[str, str] = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 ORDER BY 1""",
    "columns": """
        SELECT c.relname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
               a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity::text,
               a.attgenerated::text, coll.collname
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation coll ON coll.oid = a.attcollation
        WHERE n.nspname = $1 AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, con.conname, con.contype::text, pg_get_constraintdef(con.oid),
               con.condeferrable, con.condeferred
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = con.connamespace
        WHERE n.nspname = $1 ORDER BY 1, 2""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 ORDER BY 1""",
    "sequences": """
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
               s.seqmax, s.seqmin, s.seqcache, s.seqcycle
        FROM pg_sequence s
        JOIN pg_class c ON c.oid = s.seqrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = $1 ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND NOT t.tgisinternal ORDER BY 1, 2""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('v', 'm') ORDER BY 1""",
    "types": """
        SELECT t.typname, t.typtype::text, format_type(t.oid, NULL)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = $1 AND t.typrelid = 0 AND t.typelem = 0 ORDER BY 1""",
}


async def describe(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """A schema's catalog, with its own name replaced by `<schema>`."""
    # Also inside NOTIFY channel names such as '<schema>_jobs'.
    name = re.compile(rf'"{schema}"|\b{schema}(?=\b|_)')

    def normal(value: Any) -> Any:
        return name.sub("<schema>", value) if isinstance(value, str) else value

    out = {}
    for kind, sql in CATALOG.items():
        rows = await conn.fetch(sql, schema)
        out[kind] = [tuple(normal(v) for v in row) for row in rows]
    return out


async def test_fresh_schema_equals_all_migrations_applied(db: Any) -> None:
    fresh, migrated = "from_schema_file", "from_migrations"
    conn = await asyncpg.connect(db.dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA {fresh}")
            await conn.execute(render(schema_sql(), fresh))
            await conn.execute(f"CREATE SCHEMA {migrated}")
            for m in migrations():
                await conn.execute(render(m.sql, migrated))
            # As migrate() does after applying any migration.
            await conn.execute(render(functions_sql(), migrated))

        a = await describe(conn, fresh)
        b = await describe(conn, migrated)
        assert {r[0] for r in a["relations"] if r[1] in ("r", "p")} >= TABLES
        assert a["functions"]
        assert a["triggers"]
        for kind in CATALOG:
            assert a[kind] == b[kind], f"{kind} differ between schema.sql and the migrations"

        # The comparison notices a difference of each kind.
        changes = [
            ("columns", "ALTER TABLE {s}.jobs ALTER COLUMN priority SET DEFAULT 1"),
            ("columns", "ALTER TABLE {s}.jobs ALTER COLUMN run_id SET NOT NULL"),
            ("constraints", "ALTER TABLE {s}.jobs ADD CHECK (priority > -100)"),
            ("indexes", "CREATE INDEX extra ON {s}.jobs (task)"),
            (
                "functions",
                "CREATE OR REPLACE FUNCTION {s}.jobs_notify_v1() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
            ),
            ("triggers", "DROP TRIGGER jobs_notify ON {s}.jobs"),
        ]
        for kind, ddl in changes:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(ddl.format(s=migrated))
                assert (await describe(conn, migrated))[kind] != a[kind], ddl
            finally:
                await tx.rollback()
    finally:
        await conn.close()


async def test_migrations_are_numbered_from_one_without_gaps() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "initial"
    for m in found:
        assert "__SCHEMA__" in m.sql
        assert re.fullmatch(r"[a-z0-9_]+", m.name)


# -- schema names --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["Durable", "a;drop", "", "1abc", "x" * 60, 'a"b', "a b"])
async def test_invalid_schema_names_are_refused(bad: str, db: Any) -> None:
    with pytest.raises(ConfigurationError, match="invalid schema name") as info:
        validate_schema(bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        Queries(bad)
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        render("SELECT 1 FROM __SCHEMA__.jobs", bad)
    conn = await asyncpg.connect(db.dsn)
    try:
        with pytest.raises(ConfigurationError, match="invalid schema name"):
            await migrate(conn, bad)
        # Nothing was created.
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", bad) == 0
    finally:
        await conn.close()


async def test_a_non_default_schema_works_end_to_end(empty_dsn: str) -> None:
    schema = "jobs_alt"
    queries = Queries(schema)
    jobs = JobQueue(queries)
    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=8)
    assert pool is not None
    notified: list[str] = []

    def on_notify(*args: Any) -> None:
        notified.append(args[2])

    async def handler(c: asyncpg.Connection, j: Any) -> None:
        await c.execute("INSERT INTO effects VALUES ($1)", j.payload["i"])

    try:
        async with pool.acquire() as conn:
            assert await migrate(conn, schema) == [m.version for m in migrations()]
            assert await tables(conn, schema) >= TABLES
            assert await tables(conn, "durable") == set()
            n = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'durable'")
            assert n == 0
            await conn.execute("CREATE TABLE effects (i int)")

        worker = Worker(pool, queries, {"t": handler}, queues=["q"], concurrency=2)
        async with anyio.create_task_group() as tg, pool.acquire() as conn:
            await tg.start(worker.run)

            async def worker_listens() -> bool:
                n: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'idle' AND query ILIKE 'LISTEN%jobs_alt_jobs%'"
                )
                return n > 0

            await poll(worker_listens, timeout=10)

            async def worker_registered() -> bool:
                # Job inserts NOTIFY only while an idle worker is registered as a listener.
                n: int = await conn.fetchval(f'SELECT count(*) FROM "{schema}".listeners')
                return n > 0

            await poll(worker_registered, timeout=10)
            await conn.add_listener(queries.notify_channel, on_notify)
            assert queries.notify_channel == "jobs_alt_jobs"

            # Enqueue and claim by hand (a queue the worker does not serve).
            async with conn.transaction():
                job_id = await jobs.enqueue(conn, "manual", "t", {"i": 1})
            async with conn.transaction():
                job = await jobs.claim(conn, ["manual"])
                assert job is not None
                assert job.id == job_id
                await jobs.delete(conn, job.id)
            assert await jobs.count(conn) == 0
            # The insert woke the schema's own channel.
            await poll(lambda: _true(bool(notified)), timeout=5, interval=0.01)
            assert set(notified) == {"jobs_alt_jobs"}
            await conn.remove_listener(queries.notify_channel, on_notify)

            # And the worker runs jobs of that schema.
            async with conn.transaction():
                for i in range(10):
                    await jobs.enqueue(conn, "q", "t", {"i": i})

            async def drained() -> bool:
                return await jobs.count(conn) == 0

            await poll(drained, timeout=10)
            worker.stop()
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT count(DISTINCT i) FROM effects") == 10
            assert await c.fetchval("SELECT count(*) FROM effects") == 10
    finally:
        await pool.close()


async def _true(value: bool) -> bool:
    return value
