"""The global invariant, checked after every test that had a database: every unfinished
run has exactly the jobs its state needs, or a recorded reason to wait for none; no job
names a run that does not exist (jobs have no foreign key to runs); and no workflow's
bound on active runs is exceeded, nor a run queued for a slot while one is free.

Written from the rules of the run's state (docs/architecture.md), not by calling
ensure_jobs_v1, so that a wrong job set is caught whichever path produced it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg

RUNS = """
SELECT r.id, r.status, r.current_node, r.wake_at, r.waiting_for, r.child_id, r.branches,
       r.finished_at IS NOT NULL AS finished, r.paused_at IS NOT NULL AS paused,
       EXISTS (SELECT 1 FROM durable.cancel_requests q WHERE q.run_id = r.id) AS cancel,
       (SELECT c.finished_at IS NOT NULL FROM durable.runs c WHERE c.id = r.child_id)
           AS child_finished,
       EXISTS (SELECT 1 FROM durable.signals s
               WHERE s.run_id = r.id AND s.name = r.waiting_for AND s.consumed_at IS NULL)
           AS signal_there,
       ARRAY(SELECT split_part(e.key, '#', 2) FROM durable.journal e
             WHERE e.run_id = r.id AND e.node = r.current_node AND strpos(e.key, '#') > 0
               AND e.status = 'completed') AS committed,
       r.concurrency_key IS NOT NULL AS bounded, r.slot, r.concurrency,
       (SELECT count(*) FROM durable.runs h
         WHERE h.workflow = r.workflow AND h.concurrency_key = r.concurrency_key
           AND h.slot = 'held' AND h.finished_at IS NULL) AS held
FROM durable.runs r
WHERE r.queue <> ''  -- started by an engine (tests of the bare queue insert rows by hand)
"""
JOBS = """
SELECT j.run_id, j.task, j.branch FROM durable.jobs j
WHERE j.run_id IS NOT NULL
  -- a paused run's lease in flight is its holder's to settle
  AND NOT (j.lease_token IS NOT NULL AND EXISTS (
      SELECT 1 FROM durable.runs r WHERE r.id = j.run_id AND r.paused_at IS NOT NULL))
"""
ORPHANS = """
SELECT j.id, j.run_id, j.task FROM durable.jobs j
WHERE j.run_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM durable.runs r WHERE r.id = j.run_id)
"""


def needed(run: Any) -> Counter[tuple[str, str | None]]:
    """The jobs a run's state needs: (task, branch) -> how many (always 1)."""
    if run["finished"] or run["paused"]:
        return Counter()
    if run["status"] == "compensating":
        return Counter({("compensate", None): 1})
    if run["cancel"]:
        return Counter({("advance", None): 1})
    if run["bounded"] and run["slot"] == "queued":
        return Counter()  # waits for a slot of its workflow's bound (see `bounds`)
    if run["bounded"] and run["slot"] is None:
        return Counter({("admit", None): 1})
    if run["branches"] is not None:
        return Counter(
            {("branch", b): 1 for b in run["branches"] if b not in set(run["committed"])}
        )
    if run["child_id"] is not None:
        waiting_child = run["child_finished"] is False
        return Counter() if waiting_child else Counter({("advance", None): 1})
    if run["waiting_for"] is not None:
        if run["signal_there"] or run["wake_at"] is not None:
            return Counter({("advance", None): 1})
        return Counter()
    return Counter({("advance", None): 1})


def bounds(run: Any) -> list[str]:
    """A bounded run's reason to be queued (every slot of its key held; a paused run is
    admitted when resumed), and its key's bound respected."""
    if run["finished"] or not run["bounded"]:
        return []
    if run["held"] > run["concurrency"]:
        return [
            f"run {run['id']}: {run['held']} runs hold a slot of a bound of {run['concurrency']}"
        ]
    if run["slot"] == "queued" and not run["paused"] and run["held"] < run["concurrency"]:
        return [
            f"run {run['id']} is queued for a slot while only {run['held']} of "
            f"{run['concurrency']} are held"
        ]
    return []


async def violations(dsn: str) -> list[str]:
    """Every run whose jobs differ from what its state needs, described."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('durable.runs')") is None:
            return []
        runs = await conn.fetch(RUNS)
        jobs: dict[str, Counter[tuple[str, str | None]]] = {}
        for job in await conn.fetch(JOBS):
            jobs.setdefault(job["run_id"], Counter())[(job["task"], job["branch"])] += 1
        orphans = await conn.fetch(ORPHANS)
    finally:
        await conn.close()
    found = [
        f"job {o['id']} ({o['task']}) names run {o['run_id']}, which does not exist"
        for o in orphans
    ]
    for run in runs:
        found += bounds(run)
        have = jobs.get(run["id"], Counter())
        want = needed(run)
        if have != want:
            found.append(
                f"run {run['id']} ({run['status']} at {run['current_node']!r}, "
                f"waiting_for={run['waiting_for']!r}, child={run['child_id']!r}, "
                f"branches={run['branches']!r}, cancel={run['cancel']}) has jobs "
                f"{dict(have)} but its state needs {dict(want)}"
            )
    return found
