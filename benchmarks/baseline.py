"""The raw-commit floor: a plain asyncpg loop, per transaction BEGIN, UPDATE one row,
INSERT one row, COMMIT — the least a durable step can cost (one durable commit that moves
state and records something). Measured on one connection and on 8 concurrently."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import asyncpg

from benchmarks.common import progress

SETUP = """
CREATE TABLE bench_counter (
    id integer PRIMARY KEY,
    n bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bench_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    counter_id integer NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bench_counter (id) SELECT g FROM generate_series(1, 64) g;
"""

UPDATE = "UPDATE bench_counter SET n = n + 1, updated_at = now() WHERE id = $1"
INSERT = "INSERT INTO bench_log (counter_id, payload) VALUES ($1, $2::jsonb)"


async def _loop(conn: asyncpg.Connection, counter: int, n: int) -> None:
    payload = json.dumps({"counter": counter})
    for _ in range(n):
        async with conn.transaction():
            await conn.execute(UPDATE, counter)
            await conn.execute(INSERT, counter, payload)


async def measure(dsn: str, *, connections: int, transactions: int) -> dict[str, Any]:
    """Transactions per second of `connections` loops sharing `transactions` in total
    (each connection updates its own row, so they never wait for each other's locks)."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        if await conns[0].fetchval("SELECT to_regclass('bench_counter')") is None:
            await conns[0].execute(SETUP)
        per_conn = max(1, transactions // connections)
        # Warm up: prepared statements cached, pages in shared buffers.
        async with anyio.create_task_group() as tg:
            for i, conn in enumerate(conns):
                tg.start_soon(_loop, conn, i + 1, 20)
        progress(f"baseline: {connections} connection(s) x {per_conn} transactions")
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, conn in enumerate(conns):
                tg.start_soon(_loop, conn, i + 1, per_conn)
        elapsed = time.perf_counter() - t0
    finally:
        for conn in conns:
            await conn.close()
    total = per_conn * connections
    rate = total / elapsed
    progress(f"baseline-{connections}: {rate:,.0f} tx/s ({total} in {elapsed:.2f} s)")
    return {
        "value": rate,
        "unit": "tx/s",
        "connections": connections,
        "transactions": total,
        "seconds": elapsed,
    }
