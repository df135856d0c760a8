"""Partitioned history (issue 17): runs and their journal, attempts and signals partitioned
by the month of the run id, a DEFAULT partition for any other id, keys unique across
months, and retention by dropping a whole month (`Engine.drop_history`)."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from helpers import eventually, execute, fetch, fetchval, open_engine, running_engine
from ulid import ULID

import durable
from durable.cli import main

DAY = timedelta(days=1)
OLD = datetime(2026, 3, 1, tzinfo=UTC)  # months before any run a test starts
OLDER = datetime(2026, 2, 1, tzinfo=UTC)


def one_step(name: str = "order") -> durable.Workflow:
    wf = durable.Workflow(name)

    async def work(ctx: durable.Context) -> Any:
        return ctx.input

    wf.step("work", work)
    return wf


def old_id(month: datetime, n: int) -> str:
    """A run id made `n` milliseconds into `month`, as a ULID made then would be."""
    return str(ULID.from_datetime(month + timedelta(milliseconds=n)))


# Finished runs of a past month ($1), each with two journal rows, a failed attempt, a
# consumed signal and an idempotency key, finished $4 days ago (or unfinished: status $3).
FILL_MONTH = """
INSERT INTO durable.runs (id, workflow, queue, status, input, result, cursor,
                          created_at, updated_at, finished_at, idempotency_key)
SELECT durable.ulid_prefix_v1(t.at) || lpad(g::text, 16, '0'), 'order', 'order@x', $3, '{}',
       '{}', 1, t.at, t.at,
       CASE WHEN $3 IN ('completed', 'failed', 'cancelled') THEN now() - $4 * interval '1 day' END,
       'key-' || to_char($1::timestamptz, 'YYYYMM') || '-' || g
FROM generate_series(1, $2) AS g,
     LATERAL (SELECT $1::timestamptz + g * interval '1 millisecond') AS t (at);
CREATE TEMPORARY TABLE month_runs ON COMMIT DROP AS
SELECT * FROM durable.runs
WHERE id >= durable.ulid_prefix_v1($1::timestamptz)
  AND id < durable.ulid_prefix_v1($1::timestamptz + interval '1 month');
INSERT INTO durable.journal (run_id, key, node, status, result)
SELECT r.id, k, k, 'completed', '{}' FROM month_runs r, unnest(ARRAY['a', 'b']) AS k;
INSERT INTO durable.attempts (run_id, key, attempt, error)
SELECT r.id, 'a', 1, 'boom' FROM month_runs r;
INSERT INTO durable.signals (run_id, name, payload, consumed_by, consumed_at)
SELECT r.id, 'go', '1', 'a', now() FROM month_runs r;
INSERT INTO durable.run_keys (kind, workflow, key, run_id)
SELECT 'idempotency', r.workflow, r.idempotency_key, r.id FROM month_runs r;
"""


async def fill_month(
    engine: durable.Engine,
    month: datetime,
    runs: int,
    *,
    status: str = "completed",
    days_ago: int = 100,
) -> None:
    """`runs` runs of `month` in its own partition (made here), with their history rows."""
    async with engine.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT durable.ensure_partitions_v1($1, 0)", month)
        args = (month, runs, status, days_ago)
        for statement in FILL_MONTH.strip().split(";\n"):
            used = max((int(n) for n in re.findall(r"\$(\d)", statement)), default=0)
            await conn.execute(statement, *args[:used])


async def tables_of(engine: durable.Engine, run_id: str) -> set[str]:
    """The partitions that hold the rows of run `run_id`."""
    rows = await fetch(
        engine,
        """
        SELECT tableoid::regclass::text FROM durable.runs WHERE id = $1
        UNION SELECT tableoid::regclass::text FROM durable.journal WHERE run_id = $1
        UNION SELECT tableoid::regclass::text FROM durable.attempts WHERE run_id = $1
        UNION SELECT tableoid::regclass::text FROM durable.signals WHERE run_id = $1
        """,
        run_id,
    )
    return {r[0] for r in rows}


async def test_migrate_makes_this_month_and_the_next_and_a_run_lands_in_this_month(
    db: Any,
) -> None:
    wf = durable.Workflow("waits")

    async def first(ctx: durable.Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("once")
        return 1

    wf.step("first", first, max_attempts=2, backoff=0.01)
    wf.wait_for_signal("wait", "go")
    now = datetime.now(UTC)
    this = f"y{now:%Y}m{now:%m}"
    async with running_engine(db, wf) as engine:
        names = [p.name for p in await engine.history_partitions()]
        assert this in names
        assert names.index(this) == len(names) - 2, names  # and one month ahead
        assert await fetchval(engine, "SELECT durable.ensure_partitions_v1(now(), 1)") == []
        run_id = await engine.start(wf)
        await engine.signal(run_id, "go", {"ok": True})
        assert await engine.wait(run_id, timeout=15) == {"first": 1, "wait": {"ok": True}}
        assert await tables_of(engine, run_id) == {
            f"durable.{t}_{this}" for t in ("runs", "journal", "attempts", "signals")
        }


async def test_a_run_id_no_month_covers_goes_to_the_default_partition(db: Any) -> None:
    async with open_engine(db) as engine:
        far = old_id(datetime(2001, 1, 1, tzinfo=UTC), 1)
        await execute(
            engine,
            "INSERT INTO durable.runs (id, workflow, input) VALUES ($1, 'order', '{}'); "
            "INSERT INTO durable.journal (run_id, key, node, status) "
            "VALUES ($1, 'a', 'a', 'completed')".replace("$1", f"'{far}'"),
        )
        assert await tables_of(engine, far) == {"durable.runs_default", "durable.journal_default"}


async def test_drop_history_drops_old_finished_months_whole_and_keeps_the_rest(db: Any) -> None:
    wf = one_step()
    async with running_engine(db, wf) as engine:
        await fill_month(engine, OLDER, 500)
        await fill_month(engine, OLD, 300, days_ago=10)
        live = await engine.start(wf, {"n": 1})
        assert await engine.wait(live, timeout=15) == {"work": {"n": 1}}
        before = {p.name: p for p in await engine.history_partitions()}
        older, old = f"y{OLDER:%Y}m{OLDER:%m}", f"y{OLD:%Y}m{OLD:%m}"
        assert before[older].start == OLDER
        assert before[older].end == OLD

        dry = await engine.drop_history(older_than=30 * DAY, dry_run=True)
        assert dry.dropped == [older]
        assert dry.kept[old] == "recent"  # finished 10 days ago
        assert set(dry.kept.values()) == {"recent", "current"}
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 801

        report = await engine.drop_history(older_than=30 * DAY)
        assert report.dropped == [older]
        assert report.seconds[older] < 1.0
        assert report.keys_deleted == 500
        names = [p.name for p in await engine.history_partitions()]
        assert older not in names
        assert old in names
        tables = await fetch(
            engine,
            "SELECT relname FROM pg_class WHERE relname LIKE $1",
            f"%{older}",
        )
        assert tables == []
        # The rest is all there: the newer old month, and the run of today.
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 301
        assert await fetchval(engine, "SELECT count(*) FROM durable.journal") == 601
        assert await fetchval(engine, "SELECT count(*) FROM durable.run_keys") == 300
        assert (await engine.get_run(live)).status is durable.RunStatus.COMPLETED
        # A shorter retention drops the next month too.
        assert (await engine.drop_history(older_than=5 * DAY)).dropped == [old]
        assert await fetchval(engine, "SELECT count(*) FROM durable.signals") == 0


async def test_a_month_with_an_unfinished_run_is_kept_until_it_finishes(db: Any) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 50)
        straggler = old_id(OLD, 10_000)
        await execute(
            engine,
            f"INSERT INTO durable.runs (id, workflow, queue, status, input, current_node) "
            f"VALUES ('{straggler}', 'order', 'order@x', 'waiting', '{{}}', 'wait')",
        )
        name = f"y{OLD:%Y}m{OLD:%m}"
        report = await engine.drop_history(older_than=30 * DAY)
        assert report.kept[name] == "unfinished"
        assert report.dropped == []
        # purge still takes the finished runs of a kept month, row by row
        assert await engine.purge(older_than=30 * DAY) == 50
        assert await fetchval(engine, "SELECT count(*) FROM durable.journal") == 0
        assert await fetchval(engine, "SELECT count(*) FROM durable.run_keys") == 0
        await execute(
            engine,
            "UPDATE durable.runs SET status = 'cancelled', current_node = NULL, "
            "finished_at = now() - interval '40 days' WHERE id = $1",
            straggler,
        )
        assert (await engine.drop_history(older_than=30 * DAY)).dropped == [name]


async def test_a_child_of_an_unfinished_run_keeps_its_month(db: Any) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        child = await fetchval(engine, "SELECT min(id) FROM durable.runs")
        parent = str(ULID())
        await execute(
            engine,
            f"INSERT INTO durable.runs (id, workflow, status, input, child_id) "
            f"VALUES ('{parent}', 'order', 'waiting', '{{}}', '{child}'); "
            f"UPDATE durable.runs SET parent_id = '{parent}' WHERE id = '{child}'",
        )
        report = await engine.drop_history(older_than=30 * DAY)
        assert report.kept[f"y{OLD:%Y}m{OLD:%m}"] == "awaited"


async def test_what_refers_to_a_dropped_run_lets_go_of_it(db: Any) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        parent = await fetchval(engine, "SELECT min(id) FROM durable.runs")
        child = str(ULID())
        await execute(
            engine,
            f"INSERT INTO durable.runs (id, workflow, status, input, parent_id, finished_at) "
            f"VALUES ('{child}', 'order', 'completed', '{{}}', '{parent}', now()); "
            "INSERT INTO durable.schedules (name, workflow, cron, timezone, overlap, catch_up, "
            "max_catch_up, next_at, last_run_id) VALUES ('nightly', 'order', '0 3 * * *', "
            f"'UTC', 'skip', 'none', 1, now(), '{parent}')",
        )
        assert (await engine.drop_history(older_than=30 * DAY)).dropped
        assert (
            await fetchval(engine, f"SELECT parent_id FROM durable.runs WHERE id = '{child}'")
            is None
        )
        assert await fetchval(engine, "SELECT last_run_id FROM durable.schedules") is None


async def test_an_idempotency_key_is_unique_across_months_and_free_once_its_run_is_dropped(
    db: Any,
) -> None:
    wf = one_step()
    async with open_engine(db, wf) as engine:
        await fill_month(engine, OLD, 3)
        old_run = await fetchval(engine, "SELECT min(id) FROM durable.runs")
        key = await fetchval(
            engine, f"SELECT idempotency_key FROM durable.runs WHERE id = '{old_run}'"
        )
        # A start today with the key of a run of March returns that run, as before.
        await execute(engine, "UPDATE durable.runs SET input = '{\"n\": 1}'")
        assert await engine.start(wf, {"n": 1}, idempotency_key=key) == old_run
        with pytest.raises(durable.IdempotencyConflict):
            await engine.start(wf, {"n": 2}, idempotency_key=key)
        # Dropped, its key names no run: free for a new one, before and after the cleanup.
        await execute(
            engine, "SELECT durable.drop_history_partition_v1($1, 0)", f"y{OLD:%Y}m{OLD:%m}"
        )
        assert await fetchval(engine, "SELECT count(*) FROM durable.run_keys") == 3
        again = await engine.start(wf, {"n": 2}, idempotency_key=key)
        assert again != old_run
        assert await engine.start(wf, {"n": 2}, idempotency_key=key) == again
        assert await fetchval(engine, "SELECT durable.forget_keys_v1('', '7', 100)") == 2


async def test_a_singleton_key_held_by_a_run_of_an_earlier_month_is_respected(db: Any) -> None:
    wf = one_step()
    async with running_engine(db, wf) as engine:
        await engine.pause(wf)  # the run started today stays active until resumed
        holder = old_id(OLD, 7)
        await fill_month(engine, OLD, 0)
        await execute(
            engine,
            f"INSERT INTO durable.runs (id, workflow, queue, status, input, current_node, "
            f"singleton_key) VALUES ('{holder}', 'order', '{wf.queue}', 'running', '{{}}', "
            f"'work', 'nightly'); "
            f"INSERT INTO durable.run_keys VALUES ('singleton', 'order', 'nightly', '{holder}'); "
            f"INSERT INTO durable.jobs (queue, task, run_id) VALUES ('{wf.queue}', 'advance', "
            f"'{holder}')",
        )
        assert await engine.start(wf, {"n": 1}, singleton_key="nightly") == holder
        await engine.resume(wf)
        assert await engine.wait(holder, timeout=15) == {"work": {}}
        # Finished, it lets go of the key: the next start makes a run of its own.
        assert await fetchval(engine, "SELECT count(*) FROM durable.run_keys") == 0
        fresh = await engine.start(wf, {"n": 2}, singleton_key="nightly")
        assert fresh != holder
        assert await engine.wait(fresh, timeout=15) == {"work": {"n": 2}}


async def test_a_month_whose_tables_stay_locked_is_left_busy(db: Any) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        blocker = await asyncpg.connect(db.dsn)
        try:
            tx = blocker.transaction()
            await tx.start()
            # a worker's step in flight: it holds a run of this month locked
            await blocker.execute(
                "UPDATE durable.runs SET updated_at = now() "
                "WHERE id = (SELECT max(id) FROM durable.runs)"
            )
            report = await engine.drop_history(older_than=30 * DAY, lock_timeout=0.05, attempts=2)
            await tx.rollback()
        finally:
            await blocker.close()
        name = f"y{OLD:%Y}m{OLD:%m}"
        assert report.kept[name] == "busy"
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 5
        assert (await engine.drop_history(older_than=30 * DAY)).dropped == [name]


async def test_drop_history_checks_its_arguments(db: Any) -> None:
    async with open_engine(db) as engine:
        with pytest.raises(durable.ArgumentTypeError):
            await engine.drop_history(older_than=30)  # type: ignore[arg-type]
        with pytest.raises(durable.ArgumentError):
            await engine.drop_history(older_than=-DAY)
        with pytest.raises(durable.ArgumentError):
            await engine.drop_history(older_than=DAY, lock_timeout=0)
        # A partition that is not there (another drop took it) is DU080, which
        # drop_history passes over.
        with pytest.raises(asyncpg.PostgresError) as info:
            await fetchval(engine, "SELECT durable.history_blocker_v1('y1999m01', 0)")
        assert info.value.sqlstate == "DU080"


async def test_history_list_and_drop_from_the_command_line(db: Any) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 20)
        name = f"y{OLD:%Y}m{OLD:%m}"
        code, listed = await cli(db, "history", "list")
        assert code == 0
        assert listed[0]["name"] == name
        assert listed[0]["start"] == OLD.isoformat()
        code, body = await cli(db, "history", "drop", "--older-than", "30d", "--dry-run")
        assert (code, body["dry_run"], body["dropped"]) == (0, True, [name])
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 20
        code, body = await cli(db, "history", "drop", "--older-than", "30d")
        assert (code, body["dropped"], body["keys_deleted"]) == (0, [name], 20)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 0
        assert (await cli(db, "history", "drop", "--older-than", "soon"))[0] == 2


async def cli(db: Any, *argv: str) -> tuple[int, Any]:
    """`durable --dsn ... --json ARGV` in this process: exit code and parsed output."""
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(lambda: main(["--dsn", db.dsn, "--json", *argv], out))
    return code, json.loads(out.getvalue()) if out.getvalue() else None


async def test_a_month_that_cannot_be_made_now_is_left_for_the_next_call(db: Any) -> None:
    async with open_engine(db) as engine:
        reader = await asyncpg.connect(db.dsn)
        try:
            tx = reader.transaction()
            await tx.start()
            # A transaction that read the default partition: attaching a month waits for it.
            await reader.fetch("SELECT 1 FROM durable.runs WHERE id = 'zz-not-a-ulid'")
            made = await fetchval(engine, "SELECT durable.ensure_partitions_v1('2031-01-01', 0)")
            await tx.rollback()
        finally:
            await reader.close()
        assert made == []
        assert await fetchval(engine, "SELECT to_regclass('durable.runs_y2031m01')") is None
        made = await fetchval(engine, "SELECT durable.ensure_partitions_v1('2031-01-01', 0)")
        assert made == ["y2031m01"]


async def test_a_dropped_months_files_go_without_waiting_for_the_history_tables(
    db: Any,
) -> None:
    """A drop detaches the month under the tables' locks, then drops its tables in
    transactions that lock only them: a worker's transaction on runs and journal does not
    hold that back. A drop that stopped in between is finished by the next one."""
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        name = f"y{OLD:%Y}m{OLD:%m}"
        assert (
            await fetchval(engine, "SELECT durable.drop_history_partition_v1($1, 0)", name) is None
        )
        left = [r[0] for r in await fetch(engine, "SELECT durable.detached_history_v1()")]
        assert left == [f"{t}_{name}" for t in ("attempts", "journal", "runs", "signals")]
        assert name not in [p.name for p in await engine.history_partitions()]
        worker = await asyncpg.connect(db.dsn)
        try:
            tx = worker.transaction()
            await tx.start()
            run = str(ULID())
            await worker.execute(
                "INSERT INTO durable.runs (id, workflow, input) VALUES ($1, 'order', '{}')", run
            )
            await worker.execute(
                "INSERT INTO durable.journal (run_id, key, node, status) "
                "VALUES ($1, 'a', 'a', 'completed')",
                run,
            )
            report = await engine.drop_history(older_than=30 * DAY)
            assert await fetch(engine, "SELECT durable.detached_history_v1()") == []
            await tx.rollback()
        finally:
            await worker.close()
        assert report.dropped == []  # it had gone already
        # Only those tables: nothing else of the schema is dropped by name.
        assert await fetchval(engine, "SELECT durable.drop_detached_history_v1('jobs')") is False


async def detached(engine: durable.Engine) -> list[str]:
    """The tables of detached partitions not dropped yet."""
    return [r[0] for r in await fetch(engine, "SELECT durable.detached_history_v1()")]


async def test_a_months_tables_are_dropped_side_by_side(db: Any) -> None:
    """Each detached table is dropped on a connection of its own: one that waits for its
    lock holds none of the others back."""
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        name = f"y{OLD:%Y}m{OLD:%m}"
        # detached by a drop that stopped before dropping the tables
        await fetchval(engine, "SELECT durable.drop_history_partition_v1($1, 0)", name)
        reader = await asyncpg.connect(db.dsn)
        try:
            tx = reader.transaction()
            await tx.start()
            await reader.fetchval(f"SELECT count(*) FROM durable.journal_{name}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.drop_history(older_than=30 * DAY))
                # ordered by name, journal's would be the second of four drops
                await eventually(lambda: _only(engine, [f"journal_{name}"]))
                await tx.rollback()
        finally:
            await reader.close()
        assert await detached(engine) == []


async def _only(engine: durable.Engine, tables: list[str]) -> bool:
    return await detached(engine) == tables


async def test_every_detached_table_is_dropped_though_one_fails_and_the_next_call_drops_it(
    db: Any,
) -> None:
    async with open_engine(db) as engine:
        await fill_month(engine, OLD, 5)
        name = f"y{OLD:%Y}m{OLD:%m}"
        # Someone's view of the month's journal: dropping that table fails, while attached
        # it held nothing back.
        await execute(
            engine, f"CREATE VIEW public.old_journal AS SELECT * FROM durable.journal_{name}"
        )
        with pytest.raises(asyncpg.DependentObjectsStillExistError):
            await engine.drop_history(older_than=30 * DAY)
        assert await detached(engine) == [f"journal_{name}"]
        assert name not in [p.name for p in await engine.history_partitions()]
        assert await fetchval(engine, "SELECT count(*) FROM durable.run_keys") == 0
        with pytest.raises(asyncpg.DependentObjectsStillExistError):
            await engine.drop_history(older_than=30 * DAY)  # still there: says so again
        await execute(engine, "DROP VIEW public.old_journal")
        report = await engine.drop_history(older_than=30 * DAY)
        assert report.dropped == []  # the month had gone already
        assert await detached(engine) == []
