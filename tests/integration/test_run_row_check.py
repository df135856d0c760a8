"""The rules every row of `runs` satisfies, enforced by the database (sql/schema.sql,
`run_row_ok_v1`): each one refuses a row that breaks it, and they are one CHECK constraint,
as twelve cost every step's UPDATE of its run about 60 µs (docs/performance.md)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from helpers import open_engine

import durable

BROKEN = {
    "empty workflow": "workflow = ''",
    "unknown status": "status = 'sleeping'",
    "finished without finished_at": "status = 'completed'",
    "finished_at while unfinished": "finished_at = now()",
    "negative cursor": "cursor = -1",
    "negative iteration": "iteration = -1",
    "attempt zero": "attempt = 0",
    "negative epoch": "epoch = -1",
    "unknown ending": "ending = 'paused'",
    "version zero": "version = 0",
    "priority out of range": "priority = 101",
    "concurrency zero": "concurrency = 0",
    "unknown slot": "slot = 'maybe'",
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
async def test_a_run_row_breaking_a_rule_is_refused(db: Any, rule: str) -> None:
    wf = durable.Workflow("rules")
    wf.step("only", lambda ctx: 1)
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        async with engine.pool.acquire() as conn:
            # Without the status-change trigger, which refuses some of these first.
            await conn.execute("SET session_replication_role = replica")
            with pytest.raises(asyncpg.CheckViolationError, match="runs_row_check"):
                await conn.execute(f"UPDATE durable.runs SET {BROKEN[rule]} WHERE id = $1", run_id)
            # The row as it was: nothing of the refused update stuck.
            await conn.execute("RESET session_replication_role")
            row = await conn.fetchrow(
                "SELECT status, cursor FROM durable.runs WHERE id = $1", run_id
            )
    assert (row["status"], row["cursor"]) == ("pending", 0)


async def test_runs_has_one_check_constraint(db: Any) -> None:
    async with open_engine(db) as engine, engine.pool.acquire() as conn:
        checks = await conn.fetch(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'durable.runs'::regclass AND contype = 'c'"
        )
    assert [c["conname"] for c in checks] == ["runs_row_check"]
