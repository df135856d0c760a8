"""`durable doctor`: what an operator checks when runs are slow or stuck.

Each check reads the database and returns a `Finding`: `ok`, `warn` (worth a look) or
`problem` (something is stuck or will get worse). The checks:

- stranded runs: unfinished runs with no job and no recorded reason to wait (the
  invariant `ensure_jobs_v1` keeps; any is a bug, and `durable doctor` names them);
- the oldest due job: how long the queue's head has waited (no worker for its queue, or
  workers too busy);
- long transactions: sessions (or prepared transactions) that hold the xmin horizon back,
  so that vacuum cannot clean the hot tables;
- table bloat: dead rows of durable's tables, and their sizes;
- listeners: a notification queue filling up, workers that stopped listening;
- stale workers: registered workers whose heartbeat stopped (killed without a goodbye);
- the claim's plan: `EXPLAIN` of the claim query, which must walk `jobs_ready_idx`;
- history partitions: this month's and next month's partitions of the history tables,
  without which their runs go to the DEFAULT partition, where no month can be dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from durable.db import Connection
from durable.migrate import PARTITIONS_AHEAD
from durable.sql import Queries

OK, WARN, PROBLEM = "ok", "warn", "problem"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: `status` is ok, warn or problem."""

    check: str
    status: str
    summary: str
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Thresholds:
    """When a check starts to complain (seconds, rows, ratios)."""

    job_age: float = 60.0
    transaction_age: float = 300.0
    dead_rows: int = 10_000
    dead_ratio: float = 0.2
    notify_queue: float = 0.5
    seq_scan_rows: int = 1_000


@dataclass(frozen=True)
class Report:
    """Every finding; `healthy` when all are ok."""

    findings: list[Finding]

    @property
    def healthy(self) -> bool:
        return all(f.status == OK for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "findings": [asdict(f) for f in self.findings]}


async def diagnose(conn: Connection, q: Queries, limits: Thresholds | None = None) -> Report:
    """Run every check on `conn` (durable's schema `q.schema`)."""
    t = limits or Thresholds()
    checks = (
        _stranded(conn, q),
        _oldest_due(conn, q, t),
        _transactions(conn, q, t),
        _tables(conn, q, t),
        _listeners(conn, q, t),
        _stale_workers(conn, q),
        _claim_plan(conn, q, t),
        _partitions(conn, q),
    )
    return Report([await check for check in checks])


async def _stranded(conn: Connection, q: Queries) -> Finding:
    rows = await conn.fetch(q["doctor_stranded"], 20)
    if not rows:
        return Finding("stranded_runs", OK, "every unfinished run has a job or a reason to wait")
    total = rows[0]["total"]
    return Finding(
        "stranded_runs",
        PROBLEM,
        f"{total} unfinished run(s) have no job and no reason to wait: nothing will move "
        "them (cancel, retry or fork them, and report the bug)",
        [
            {
                "run_id": r["id"],
                "workflow": r["workflow"],
                "status": r["status"],
                "node": r["current_node"],
                "updated_at": r["updated_at"].isoformat(),
            }
            for r in rows
        ],
    )


async def _oldest_due(conn: Connection, q: Queries, t: Thresholds) -> Finding:
    row = await conn.fetchrow(q["doctor_oldest_due"])
    if row is None:
        return Finding("oldest_due_job", OK, "no job is waiting to be claimed")
    age = row["age"]
    detail = [{"queue": row["queue"], "task": row["task"], "run_id": row["run_id"], "age": age}]
    if age <= t.job_age:
        return Finding("oldest_due_job", OK, f"the oldest due job waits {age:.1f} s", detail)
    return Finding(
        "oldest_due_job",
        PROBLEM,
        f"a job of queue {row['queue']} has been due for {age:.0f} s: is a worker serving "
        "that workflow (and shape) running, and does it have free slots?",
        detail,
    )


async def _transactions(conn: Connection, q: Queries, t: Thresholds) -> Finding:
    rows = await conn.fetch(q["doctor_transactions"], t.transaction_age)
    if not rows:
        return Finding(
            "long_transactions", OK, f"no transaction open longer than {t.transaction_age:g} s"
        )
    return Finding(
        "long_transactions",
        PROBLEM,
        f"{len(rows)} transaction(s) open longer than {t.transaction_age:g} s hold the xmin "
        "horizon: vacuum cannot clean the job table behind them (end them, or "
        "pg_terminate_backend(pid))",
        [
            {
                "pid": r["who"],
                "state": r["state"],
                "application": r["application_name"],
                "age": round(r["age"], 1),
                "query": r["query"],
            }
            for r in rows
        ],
    )


async def _tables(conn: Connection, q: Queries, t: Thresholds) -> Finding:
    rows = await conn.fetch(q["doctor_tables"], q.schema)
    details = []
    bloated = []
    for r in rows:
        live, dead = r["live"], r["dead"]
        ratio = dead / (live + dead) if live + dead else 0.0
        entry = {
            "table": r["name"],
            "live_rows": live,
            "dead_rows": dead,
            "dead_ratio": round(ratio, 3),
            "table_bytes": r["table_bytes"],
            "index_bytes": r["index_bytes"],
            "last_autovacuum": r["last_autovacuum"].isoformat() if r["last_autovacuum"] else None,
        }
        details.append(entry)
        if dead > t.dead_rows and ratio > t.dead_ratio:
            bloated.append(r["name"])
    if bloated:
        return Finding(
            "table_bloat",
            WARN,
            f"dead rows pile up in {', '.join(bloated)}: is autovacuum keeping up (or a long "
            "transaction holding it back)?",
            details,
        )
    return Finding("table_bloat", OK, "no hot table is bloated", details)


async def _listeners(conn: Connection, q: Queries, t: Thresholds) -> Finding:
    row = await conn.fetchrow(q["doctor_listeners"])
    assert row is not None  # one row, always
    detail = [
        {
            "notify_queue_usage": row["queue_usage"],
            "listening_sessions": row["listening"],
            "stale_listener_rows": row["stale_listeners"],
        }
    ]
    if row["queue_usage"] > t.notify_queue:
        return Finding(
            "listeners",
            PROBLEM,
            f"the notification queue is {100 * row['queue_usage']:.0f}% full: a session "
            "that LISTENs does not read its notifications",
            detail,
        )
    return Finding(
        "listeners", OK, f"{row['listening']} session(s) listen; the queue is healthy", detail
    )


async def _stale_workers(conn: Connection, q: Queries) -> Finding:
    rows = await conn.fetch(q["doctor_stale_workers"])
    if not rows:
        return Finding("stale_workers", OK, "every registered worker sends heartbeats")
    return Finding(
        "stale_workers",
        WARN,
        f"{len(rows)} worker(s) stopped sending heartbeats without unregistering (killed, "
        "or their host is gone): their jobs are free again; check why they died",
        [
            {"worker": r["name"], "host": r["host"], "pid": r["pid"], "age": round(r["age"], 1)}
            for r in rows
        ],
    )


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _plan_nodes(child)
    return found


async def _claim_plan(conn: Connection, q: Queries, t: Thresholds) -> Finding:
    queues = [r["queue"] for r in await conn.fetch(q["doctor_queues"])] or ["-"]
    text = await conn.fetchval("EXPLAIN (FORMAT JSON) " + q["claim_job"], queues)
    plan = json.loads(text)[0]["Plan"]
    nodes = _plan_nodes(plan)
    scans = [
        {"node": n["Node Type"], "relation": n.get("Relation Name"), "index": n.get("Index Name")}
        for n in nodes
        if "Scan" in n["Node Type"]
    ]
    rows = await conn.fetchval(q["doctor_job_rows"])
    seq = [s for s in scans if s["node"] == "Seq Scan" and s["relation"] == "jobs"]
    if seq and (rows or 0) > t.seq_scan_rows:
        return Finding(
            "claim_plan",
            PROBLEM,
            f"the claim scans the whole job table ({rows} rows) instead of jobs_ready_idx: "
            "run ANALYZE on it, and check that the index exists",
            scans,
        )
    return Finding("claim_plan", OK, "the claim walks " + _describe(scans), scans)


def _describe(scans: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{s['node']}" + (f" of {s['index']}" if s["index"] else f" on {s['relation']}")
        for s in scans
    )


async def _partitions(conn: Connection, q: Queries) -> Finding:
    rows = await conn.fetch(q["doctor_partitions"], PARTITIONS_AHEAD)
    details = [
        {"month": r["name"], "missing": list(r["missing"]), "runs_in_default": r["in_default"]}
        for r in rows
        if r["missing"]
    ]
    if not details:
        months = " and ".join(r["name"] for r in rows)
        return Finding("history_partitions", OK, f"the history tables have months {months}")
    missing = ", ".join(d["month"] for d in details)
    fix = "`durable migrate` or any worker start makes them"
    if any(d["runs_in_default"] for d in details):
        # Attaching such a month would have to move its runs out of the DEFAULT partition,
        # which ensure_partitions_v1 does not do.
        fix += ", except for a month whose runs are in the DEFAULT partition already"
    if rows[0]["missing"]:  # this month's: runs go to the DEFAULT partition now
        return Finding(
            "history_partitions",
            PROBLEM,
            f"no history partition for {missing}: this month's new runs go to the DEFAULT "
            f"partition, which dropping a month never removes (only purge does); {fix}",
            details,
        )
    return Finding(
        "history_partitions",
        WARN,
        f"no history partition for {missing}: once that month begins, its runs go to the "
        f"DEFAULT partition, which dropping a month never removes (only purge does); {fix}",
        details,
    )
