"""`durable doctor`: each problem it looks for is reported when staged, and a healthy
database reports clean."""

from __future__ import annotations

import io
import json
from typing import Any

import anyio
import asyncpg

import durable
from durable.cli import main
from durable.doctor import Report, Thresholds, diagnose
from tests.integration.helpers import execute, fetchval, open_engine, running_engine
from tests.integration.test_run_actions import order, until


async def doctor(engine: durable.Engine, **limits: Any) -> Report:
    async with engine.pool.acquire() as conn:
        return await diagnose(conn, engine.queries, Thresholds(**limits))


def status_of(report: Report) -> dict[str, str]:
    return {f.check: f.status for f in report.findings}


async def test_a_healthy_database_reports_clean(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        run_id = await engine.start("order")
        await until(engine, run_id, durable.RunStatus.WAITING)  # waits for a signal: fine
        report = await doctor(engine)
        assert report.healthy, report
        assert set(status_of(report)) == {
            "stranded_runs",
            "oldest_due_job",
            "long_transactions",
            "table_bloat",
            "listeners",
            "stale_workers",
            "claim_plan",
            "history_partitions",
        }
        await engine.cancel(run_id)
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(lambda: main(["--dsn", db.dsn, "doctor"], out))
    assert code == 0, out.getvalue()
    assert out.getvalue().strip().endswith("healthy")


async def test_a_stranded_run_is_reported(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        run_id = await engine.start("order")
        await execute(engine, "DELETE FROM durable.jobs WHERE run_id = $1", run_id)
        report = await doctor(engine)
        finding = next(f for f in report.findings if f.check == "stranded_runs")
        assert finding.status == "problem"
        assert [d["run_id"] for d in finding.details] == [run_id]
        out = io.StringIO()
        code = await anyio.to_thread.run_sync(
            lambda: main(["--dsn", db.dsn, "--json", "doctor"], out)
        )
        assert code == 1
        body = json.loads(out.getvalue())
        assert body["healthy"] is False
        await execute(engine, "SELECT durable.ensure_jobs_v1($1)", run_id)  # repair
        assert (await doctor(engine)).healthy


async def test_an_old_due_job_is_reported(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        run_id = await engine.start("order")  # no worker runs it
        await anyio.sleep(0.3)
        finding = next(
            f for f in (await doctor(engine, job_age=0.1)).findings if f.check == "oldest_due_job"
        )
        assert finding.status == "problem"
        assert finding.details[0]["run_id"] == run_id


async def test_an_old_open_transaction_is_reported(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        conn = await asyncpg.connect(db.dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.fetchval("SELECT txid_current()")  # holds an xid, so the xmin horizon
            await anyio.sleep(1.2)
            report = await doctor(engine, transaction_age=1.0)
            finding = next(f for f in report.findings if f.check == "long_transactions")
            assert finding.status == "problem"
            pid = conn.get_server_pid()
            assert [d["pid"] for d in finding.details] == [str(pid)]
            await tx.rollback()
        finally:
            await conn.close()
        assert status_of(await doctor(engine, transaction_age=1.0))["long_transactions"] == "ok"


async def test_a_stale_worker_is_reported(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        await execute(
            engine,
            "INSERT INTO durable.workers (name, host, pid, workflows, concurrency, "
            "interval_seconds, heartbeat_at) "
            "VALUES ('gone:1', 'gone', 1, '{order}', 4, 5, now() - interval '1 hour')",
        )
        finding = next(f for f in (await doctor(engine)).findings if f.check == "stale_workers")
        assert finding.status == "warn"
        assert finding.details[0]["worker"] == "gone:1"


async def test_a_claim_that_scans_the_job_table_is_reported(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        await execute(engine, "DROP INDEX durable.jobs_ready_idx")
        await execute(
            engine,
            "INSERT INTO durable.jobs (queue, task, run_at) "
            "SELECT 'q', 'noop', now() + interval '1 hour' FROM generate_series(1, 5000)",
        )
        await execute(engine, "ANALYZE durable.jobs")
        finding = next(f for f in (await doctor(engine)).findings if f.check == "claim_plan")
        assert finding.status == "problem"
        assert "jobs_ready_idx" in finding.summary
        await execute(
            engine, "CREATE INDEX jobs_ready_idx ON durable.jobs (priority DESC, run_at, id)"
        )
        await execute(engine, "ANALYZE durable.jobs")
        finding = next(f for f in (await doctor(engine)).findings if f.check == "claim_plan")
        assert finding.status == "ok"
        assert "jobs_ready_idx" in finding.summary


HISTORY = ["runs", "journal", "attempts", "signals"]
# The name of the month `$1` months after this one (by the real clock, as run ids are).
MONTH_NAME = """
SELECT to_char(date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')
               + make_interval(months => $1), '"y"YYYY"m"MM')
"""


async def drop_partitions(engine: durable.Engine, month: str, tables: list[str]) -> None:
    """Take away the partitions of `month` of `tables` (detached first: jobs, schedules and
    cancel requests have foreign keys to each partition of runs)."""
    for table in tables:
        await execute(
            engine, f"ALTER TABLE durable.{table} DETACH PARTITION durable.{table}_{month}"
        )
        await execute(engine, f"DROP TABLE durable.{table}_{month}")


async def cli_doctor(db: Any) -> tuple[int, str]:
    """`durable --dsn ... doctor` in this process: exit code and output."""
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(lambda: main(["--dsn", db.dsn, "doctor"], out))
    return code, out.getvalue()


async def test_a_missing_partition_for_next_month_is_reported_and_migrate_makes_it(
    db: Any,
) -> None:
    async with open_engine(db, order()) as engine:
        month = await fetchval(engine, MONTH_NAME, 1)
        # as when no worker started, and no migrate ran, since this month began
        await drop_partitions(engine, month, HISTORY)
        finding = next(
            f for f in (await doctor(engine)).findings if f.check == "history_partitions"
        )
        assert finding.status == "warn"
        assert month in finding.summary
        assert "durable migrate" in finding.summary
        assert finding.details == [{"month": month, "missing": HISTORY, "runs_in_default": False}]
        code, text = await cli_doctor(db)
        assert code == 1
        assert f"WARN     history_partitions: no history partition for {month}" in text
        out = io.StringIO()
        code = await anyio.to_thread.run_sync(lambda: main(["--dsn", db.dsn, "migrate"], out))
        assert code == 0, out.getvalue()
        assert status_of(await doctor(engine))["history_partitions"] == "ok"


async def test_a_missing_partition_for_this_month_is_a_problem(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        month = await fetchval(engine, MONTH_NAME, 0)
        await drop_partitions(engine, month, ["signals"])
        finding = next(
            f for f in (await doctor(engine)).findings if f.check == "history_partitions"
        )
        assert finding.status == "problem"
        assert finding.details == [
            {"month": month, "missing": ["signals"], "runs_in_default": False}
        ]
        await drop_partitions(engine, month, ["runs", "journal", "attempts"])
        run_id = await engine.start("order")  # lands in the DEFAULT partition
        where = await fetchval(
            engine, "SELECT tableoid::regclass::text FROM durable.runs WHERE id = $1", run_id
        )
        assert where == "durable.runs_default"
        finding = next(
            f for f in (await doctor(engine)).findings if f.check == "history_partitions"
        )
        assert finding.status == "problem"
        assert finding.details == [{"month": month, "missing": HISTORY, "runs_in_default": True}]
        assert "except for a month whose runs are in the DEFAULT partition" in finding.summary
        await engine.migrate()  # cannot make this month now: its run would have to move
        assert status_of(await doctor(engine))["history_partitions"] == "problem"
