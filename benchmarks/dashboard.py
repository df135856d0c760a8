"""The dashboard with many runs in the tables: how long the runs page and the run page take
to answer with `dashboard_runs` runs (and their journal) in the database.

The runs are inserted with SQL (ids in creation order, as ULIDs are), vacuum-analyzed,
then the admin app answers in process (httpx.ASGITransport, so the figure is the server's
time: queries and rendering, no network); each page is asked `samples` times and the
median and the 95th percentile are reported. Target: the runs pages and the run page under
200 ms (the workflows page, which counts every run by status, is reported beside them).
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

import durable
from benchmarks.common import progress

#: Runs in the tables for the full benchmark; the quick run uses a fifth.
RUNS = 100_000
SAMPLES = 25
TARGET_MS = 200.0

_RUNS = """
INSERT INTO durable.runs (id, workflow, queue, status, input, result, error, cursor,
                          current_node, waiting_for, idempotency_key, created_at, updated_at,
                          finished_at)
SELECT '01' || lpad(g::text, 24, '0'),
       CASE WHEN g % 3 = 0 THEN 'refund' ELSE 'order' END,
       '',
       s.status,
       jsonb_build_object('sku', 'A' || g, 'qty', g % 7),
       CASE WHEN s.status = 'completed'
            THEN jsonb_build_object('reserve', 'ok', 'charge', g) END,
       CASE WHEN s.status = 'failed' THEN 'CardDeclined: card ' || g || ' declined' END,
       CASE WHEN s.status = 'waiting' THEN 2 ELSE 0 END,
       CASE WHEN s.status = 'waiting' THEN 'approval' END,
       CASE WHEN s.status = 'waiting' THEN 'approved' END,
       CASE WHEN g % 5 = 0 THEN 'req-' || g END,
       x.t, x.t + interval '1 second',
       CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN x.t + interval '1 second' END
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - ($3::bigint - g) * interval '1 second') AS x(t),
     LATERAL (SELECT CASE WHEN g % 20 = 0 THEN 'failed'
                          WHEN g % 20 = 1 THEN 'waiting'
                          WHEN g % 50 = 2 THEN 'cancelled'
                          ELSE 'completed' END) AS s(status)
"""

_JOURNAL = """
INSERT INTO durable.journal (run_id, key, node, status, result, error, attempts, started_at,
                             finished_at)
SELECT '01' || lpad(g::text, 24, '0'), n.key, n.key,
       CASE WHEN n.key = 'charge' AND g % 20 = 0 THEN 'failed' ELSE 'completed' END,
       CASE WHEN n.key = 'charge' AND g % 20 = 0 THEN NULL ELSE to_jsonb(g) END,
       CASE WHEN n.key = 'charge' AND g % 20 = 0 THEN 'CardDeclined' END,
       1, now() - ($3::bigint - g) * interval '1 second',
       now() - ($3::bigint - g) * interval '1 second' + interval '5 ms'
FROM generate_series($1::bigint, $2::bigint) AS g,
     (VALUES ('reserve'), ('charge')) AS n(key)
WHERE g % 20 <> 1 OR n.key = 'reserve'
"""


def run_id(g: int) -> str:
    """The id `fill_runs` gives run number `g`."""
    return "01" + str(g).rjust(24, "0")


async def fill_runs(conn: Any, runs: int) -> None:
    """Insert `runs` runs (most completed, 5% failed, 5% waiting, 2% cancelled, a fifth
    with an idempotency key) and two journal rows each, then VACUUM ANALYZE. The runs are
    not of any engine's queue, so no worker picks them up."""
    chunk = 50_000
    for first in range(1, runs + 1, chunk):
        last = min(runs, first + chunk - 1)
        async with conn.transaction():
            await conn.execute(_RUNS, first, last, runs)
            await conn.execute(_JOURNAL, first, last, runs)
    await conn.execute("VACUUM (ANALYZE) durable.runs")
    await conn.execute("VACUUM (ANALYZE) durable.journal")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(dsn: str, runs: int, samples: int = SAMPLES) -> dict[str, Any]:
    """Fill the database and time the dashboard's pages; the figure is the slowest page's
    median in ms."""
    import httpx

    from durable.web import admin_app

    async with durable.Engine(dsn):  # migrates the fresh database
        pass
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await fill_runs(conn, runs)
    finally:
        await conn.close()
    fill_seconds = time.perf_counter() - t0
    progress(f"dashboard: {runs:,} runs in {fill_seconds:.1f} s")
    token = "benchmark-token-0123456789"
    app = admin_app(dsn, token=token)
    some = run_id(runs // 2 + 20)  # a failed run with its journal
    pages = {
        "runs page": "/runs",
        "runs page, failed": "/runs?status=failed",
        "runs page, older": f"/runs?cursor={run_id(runs // 2)}",
        "runs page, by key": f"/runs?q=req-{runs // 2}",
        "runs page, refund failed": "/runs?workflow=refund&status=failed",
        "run page": f"/runs/{some}",
        "api runs": "/api/runs",
        "api run": f"/api/runs/{some}",
        "workflows page": "/workflows",
    }
    timings: dict[str, dict[str, float]] = {}
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {token}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        for label, path in pages.items():
            times = []
            for _ in range(samples + 2):
                start = time.perf_counter()
                response = await client.get(path, headers=headers)
                times.append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, (path, response.status_code)
            times = times[2:]  # the first requests plan the statements and warm the cache
            timings[label] = {"p50_ms": _percentile(times, 0.5), "p95_ms": _percentile(times, 0.95)}
            progress(f"dashboard: {label}: p50 {timings[label]['p50_ms']:.1f} ms")
    # The target is for the runs pages and the run page; the workflows page counts every
    # run by status (one scan of the table) and is reported beside them.
    worst = max(t["p50_ms"] for label, t in timings.items() if label != "workflows page")
    return {"value": worst, "runs": runs, "pages": timings, "fill_seconds": fill_seconds}
