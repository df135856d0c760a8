"""The dashboard's queries with 100,000 runs in the tables: keyset pagination and indexes,
never a sequential scan of the runs table (EXPLAIN)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from plans import explain_query

from benchmarks.dashboard import fill_runs, run_id
from durable.sql import Queries

pytestmark = pytest.mark.timeout(300)

RUNS = 100_000


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> list[Any]:
    """(node type, table, index) of every node of the plan, a history table's partitions
    named as the table (tests/integration/plans.py)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        nodes = await explain_query(conn, sql, *args)
    return [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]


async def test_no_dashboard_query_scans_the_runs_table(db: Any) -> None:
    q = Queries("durable")
    conn = await asyncpg.connect(db.dsn)
    try:
        await fill_runs(conn, RUNS)
        middle = run_id(RUNS // 2)
        failed = run_id(RUNS // 2 + 20)
        after = datetime(2000, 1, 1, tzinfo=UTC)
        list_args = {
            "newest": (None, None, 50, None, None, None, None, None),
            "status": ("failed", None, 50, None, None, None, None, None),
            "rare status": ("cancelled", None, 50, None, None, None, middle, None),
            "workflow": (None, "refund", 50, None, None, None, None, None),
            "status and workflow": ("waiting", "refund", 50, None, None, None, None, None),
            "older page": (None, None, 50, None, None, None, middle, None),
            "by id": (None, None, 50, None, None, middle, None, None),
            "by key": (None, None, 50, None, None, f"req-{RUNS // 2}", None, None),
            "created after": (None, None, 50, after, None, None, None, None),
            "created before": (None, None, 50, None, datetime.now(UTC), None, None, None),
        }
        for label, args in list_args.items():
            found = await explain(conn, q["list_runs"], *args)
            assert ("Seq Scan", "runs", None) not in found, (label, found)
        bulk = (None, "order", 100, None, None, None, None, ["failed"])
        assert ("Seq Scan", "runs", None) not in await explain(conn, q["bulk_candidates"], *bulk)
        for name in ("get_run", "get_journal", "get_attempts", "run_mailbox", "run_relatives"):
            found = await explain(conn, q[name], failed)
            assert not [s for s in found if s[0] == "Seq Scan"], (name, found)
        # and the pages really come back by keyset, newest first
        async with conn.transaction():
            await conn.execute(q["custom_plans"])
            first = await conn.fetch(q["list_runs"], None, None, 3, None, None, None, None, None)
            second = await conn.fetch(
                q["list_runs"], None, None, 3, None, None, None, first[-1]["id"], None
            )
        assert [r["id"] for r in first + second] == [run_id(RUNS - i) for i in range(6)]
    finally:
        await conn.close()
