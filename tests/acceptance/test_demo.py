"""`durable demo`, run as a real subprocess against a fresh database of the test server."""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

pytestmark = pytest.mark.timeout(120)


def _console_script() -> str:
    beside = Path(sys.executable).parent / "durable"
    if beside.exists():
        return str(beside)
    found = shutil.which("durable")
    assert found, "the `durable` console script is not installed (pip install -e '.[dev]')"
    return found


@pytest.fixture
async def fresh_dsn(server_dsn: str) -> AsyncIterator[str]:
    """An empty database: the demo migrates it and creates its own tables."""
    name = f"t_demo_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def run_demo_process(dsn: str) -> tuple[int, str, str]:
    env = {**os.environ, "DURABLE_DSN": dsn}
    with anyio.fail_after(60):  # a deadline: how fast the demo is is not a test's business
        done = await anyio.run_process([_console_script(), "demo"], env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_demo_prints_the_saga_timeline_and_summary(fresh_dsn: str) -> None:
    code, out, err = await run_demo_process(fresh_dsn)
    assert code == 0, out + err
    assert "Traceback" not in err
    # No throwaway server: the demo used DURABLE_DSN.
    assert "throwaway" not in out
    # Progress, then a timeline per order with its retries and compensations.
    for order in ("A-1001", "A-1002", "A-1003", "A-1004", "A-1005", "A-1006"):
        assert f"order {order}" in out
    for key in ("reserve", "charge", "ship", "charge@compensate", "reserve@compensate"):
        assert re.search(rf"\+\d+ ms\s+{re.escape(key)}\s", out), key
    assert "retried" in out
    assert "CarrierError: carrier API timed out" in out
    assert "NonRetryable: carrier rejects the address" in out
    assert "summary: 6 orders" in out
    assert "4 completed, 2 failed" in out
    assert out.count("compensated: payment refunded, stock released, nothing shipped") == 2
    assert "all as expected" in out

    # The business tables agree with the summary.
    conn = await asyncpg.connect(fresh_dsn)
    try:
        inventory = dict(await conn.fetch("SELECT order_no, status FROM demo_inventory"))
        payments = dict(await conn.fetch("SELECT order_no, status FROM demo_payments"))
        shipped = {r["order_no"] for r in await conn.fetch("SELECT order_no FROM demo_shipments")}
        statuses = dict(await conn.fetch("SELECT status, count(*) FROM durable.runs GROUP BY 1"))
    finally:
        await conn.close()
    assert inventory == {
        "A-1001": "reserved",
        "A-1002": "reserved",
        "A-1003": "released",
        "A-1004": "reserved",
        "A-1005": "released",
        "A-1006": "reserved",
    }
    assert payments == {
        o: ("refunded" if s == "released" else "charged") for o, s in inventory.items()
    }
    assert shipped == {"A-1001", "A-1002", "A-1004", "A-1006"}
    assert statuses == {"completed": 4, "failed": 2}


async def test_demo_runs_again_on_the_same_database(fresh_dsn: str) -> None:
    for _ in range(2):
        code, out, err = await run_demo_process(fresh_dsn)
        assert code == 0, out + err
        assert "4 completed, 2 failed" in out
