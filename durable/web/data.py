"""What the admin API and the dashboard read, as JSON-ready dicts: runs, a run with its
journal, attempts, mailbox and relatives, workflows with their counts and throughput,
workers and queues. The same dicts feed the JSON API and the templates. They only show
what is there, so they read the engine's read replica when it has one (`read_dsn`), all
but the workers' registry, which no replica has."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from durable.cli.output import human_duration, run_to_json
from durable.db import loads
from durable.engine import Engine
from durable.model import Run, RunStatus

STATUSES = [s.value for s in RunStatus]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def summary(run: Run) -> dict[str, Any]:
    """A run as the runs list shows it."""
    return {
        "id": run.id,
        "workflow": run.workflow,
        "version": 1,  # every run is of version 1 until versions are declared
        "status": run.status.value,
        "current_node": run.current_node,
        "parent_id": run.parent_id,
        "forked_from": run.forked_from,
        "paused": run.paused,
        "error": run.error,
        "created_at": iso(run.created_at),
        "updated_at": iso(run.updated_at),
        "finished_at": iso(run.finished_at),
    }


async def run_detail(engine: Engine, run_id: str) -> dict[str, Any]:
    """A run with its journal, attempts, mailbox, parent, children and timeline (raises
    `RunNotFound`)."""
    # One snapshot for the run, its history, its mailbox and its relatives, as in get_run:
    # a node's commit between the reads would show, say, a signal consumed by a node the
    # run has not passed yet.
    async with (
        engine.read_pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        run = await engine._read_run_history(conn, run_id)
        mailbox = await conn.fetch(engine.queries["run_mailbox"], run_id)
        relatives = await conn.fetch(engine.queries["run_relatives"], run_id)
    data = {**run_to_json(run, journal=True), **summary(run), "result": run.result}
    data["mailbox"] = [
        {
            "id": m["id"],
            "name": m["name"],
            "payload": loads(m["payload"]),
            "created_at": iso(m["created_at"]),
            "consumed_by": m["consumed_by"],
            "consumed_at": iso(m["consumed_at"]),
        }
        for m in mailbox
    ]
    rel = [{"id": r["id"], "workflow": r["workflow"], "status": r["status"]} for r in relatives]
    kinds = [r["relation"] for r in relatives]
    data["parent"] = next((r for r, k in zip(rel, kinds, strict=True) if k == "parent"), None)
    data["forked_from_run"] = next(
        (r for r, k in zip(rel, kinds, strict=True) if k == "forked_from"), None
    )
    data["children"] = [r for r, k in zip(rel, kinds, strict=True) if k == "child"]
    data["timeline"] = timeline(run)
    data["nodes"] = await _node_names(engine, run)
    return data


async def _node_names(engine: Engine, run: Run) -> list[str]:
    """The run's workflow's node names (from the registered workflow, else the recorded
    shape of its workflow): the choices of a fork."""
    wf = engine.workflows.get(run.workflow)
    if wf is not None:
        return [n.name for n in wf.nodes]
    async with engine.read_pool.acquire() as conn:
        text = await conn.fetchval(engine.queries["run_shape"], run.id)
    return [n[0] for n in json.loads(text)] if text else []


def timeline(run: Run) -> list[dict[str, Any]]:
    """The journal and failed attempts as bars: offset and width in percent of the span
    from the run's creation to its last event (or now), for the run page's timeline."""
    events: list[dict[str, Any]] = []
    for e in run.journal:
        start = e.started_at or e.finished_at
        events.append(
            {
                "key": e.key,
                "outcome": e.status,
                "attempt": e.attempts,
                "start": start,
                "end": e.finished_at,
                "error": e.error if e.status == "failed" else None,
            }
        )
    # The final failed attempt of a node is both an attempt row and its failed journal row.
    final = {(e.key, e.attempts) for e in run.journal if e.status == "failed"}
    for a in run.attempts:
        if (a.key, a.attempt) in final:
            continue
        events.append(
            {
                "key": a.key,
                "outcome": "retried",
                "attempt": a.attempt,
                "start": a.started_at or a.failed_at,
                "end": a.failed_at,
                "error": a.error,
            }
        )
    events.sort(key=lambda ev: (ev["start"], ev["end"]))
    origin = min([run.created_at, *(ev["start"] for ev in events)])
    last = max([run.updated_at, *(ev["end"] for ev in events)])
    span = max((last - origin).total_seconds(), 0.001)
    bars = []
    for ev in events:
        offset = (ev["start"] - origin).total_seconds()
        seconds = max((ev["end"] - ev["start"]).total_seconds(), 0.0)
        bars.append(
            {
                "key": ev["key"],
                "outcome": ev["outcome"],
                "attempt": ev["attempt"],
                "started_at": iso(ev["start"]),
                "finished_at": iso(ev["end"]),
                "offset": human_duration(offset),
                "duration": human_duration(seconds),
                "duration_seconds": seconds,
                "error": ev["error"],
                "x": round(100 * offset / span, 2),
                "width": max(round(100 * seconds / span, 2), 0.4),
            }
        )
    return bars


async def workflows(engine: Engine) -> list[dict[str, Any]]:
    """Every workflow the database or this engine knows: versions, counts by status."""
    async with engine.read_pool.acquire() as conn:
        counts = await conn.fetch(engine.queries["workflow_counts"])
        shapes = await conn.fetch(engine.queries["workflow_shapes"])
    found: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return found.setdefault(
            name,
            {
                "name": name,
                "versions": [1],
                "registered": name in engine.workflows,
                "shapes": [],
                "counts": dict.fromkeys(STATUSES, 0),
                "total": 0,
            },
        )

    for name in engine.workflows:
        entry(name)
    for row in shapes:
        nodes = [n[0] for n in json.loads(row["shape"])]
        entry(row["workflow"])["shapes"].append(
            {"queue": row["queue"], "nodes": nodes, "recorded_at": iso(row["recorded_at"])}
        )
    for row in counts:
        e = entry(row["workflow"])
        e["counts"][row["status"]] = row["runs"]
        e["total"] += row["runs"]
    return [found[k] for k in sorted(found)]


async def throughput(engine: Engine, minutes: int = 60) -> dict[str, Any]:
    """Runs finished per minute over the last `minutes`, completed and failed, for the
    charts: {"minutes": [epoch seconds], "completed": [...], "failed": [...],
    "cancelled": [...], "failure_rate": [...]}."""
    async with engine.read_pool.acquire() as conn:
        rows = await conn.fetch(engine.queries["throughput"], minutes)
        now = await conn.fetchval(engine.queries["db_now"])
    by_minute: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        by_minute[int(r["minute"].timestamp())][r["status"]] += r["runs"]
    end = int(now.timestamp()) // 60 * 60
    xs = [end - 60 * i for i in range(minutes - 1, -1, -1)]
    series: dict[str, Any] = {"minutes": xs}
    for status in ("completed", "failed", "cancelled"):
        series[status] = [by_minute.get(x, {}).get(status, 0) for x in xs]
    series["failure_rate"] = [
        round(f / (c + f), 4) if c + f else 0
        for c, f in zip(series["completed"], series["failed"], strict=True)
    ]
    return series


async def workers(engine: Engine) -> list[dict[str, Any]]:
    """The registered workers, alive (a recent heartbeat) or not."""
    # From the primary: the registry is UNLOGGED (heartbeats), so no replica has it.
    async with engine.pool.acquire() as conn:
        rows = await conn.fetch(engine.queries["list_workers"])
    return [
        {
            "name": r["name"],
            "host": r["host"],
            "pid": r["pid"],
            "workflows": list(r["workflows"]),
            "concurrency": r["concurrency"],
            "in_flight": r["in_flight"],
            "processed": r["processed"],
            "started_at": iso(r["started_at"]),
            "last_heartbeat": iso(r["heartbeat_at"]),
            "heartbeat_age_seconds": round(r["heartbeat_age"], 3),
            "alive": r["alive"],
        }
        for r in rows
    ]


async def queues(engine: Engine) -> list[dict[str, Any]]:
    """Due jobs per queue and the age of the oldest."""
    async with engine.read_pool.acquire() as conn:
        rows = await conn.fetch(engine.queries["queue_stats"])
    return [
        {"queue": r["queue"], "due": r["due"], "oldest_age_seconds": r["oldest_age"]} for r in rows
    ]


async def limits(engine: Engine) -> list[dict[str, Any]]:
    """The named limits the engine declares, and any in the database, with their use now
    per key (keys never used are absent)."""
    by_name: dict[str, dict[str, Any]] = {
        name: {
            "name": name,
            "rate": limit.rate,
            "per": limit.per,
            "concurrency": limit.concurrency,
            "in_flight": 0,
            "keys": [],
        }
        for name, limit in engine.limits.items()
    }
    for u in await engine.limit_usage():
        entry = by_name.setdefault(
            u.name,
            {
                "name": u.name,
                "rate": None,
                "per": None,
                "concurrency": None,
                "in_flight": 0,
                "keys": [],
            },
        )
        entry["in_flight"] += u.in_flight
        entry["keys"].append(
            {
                "key": u.key,
                "in_flight": u.in_flight,
                "slots": u.slots,
                "tokens": u.tokens,
                "last_start": iso(u.last_start),
            }
        )
    return [by_name[n] for n in sorted(by_name)]
