"""examples/fastapi_admin.py under a real uvicorn: the admin app mounted in a FastAPI app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("fastapi")
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "example-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_mounted_admin_app_serves_the_api_the_dashboard_and_metrics(db: Any) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DURABLE_DSN": db.dsn,
        "DURABLE_ADMIN_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - one server, started once
        [sys.executable, "-m", "uvicorn", "examples.fastapi_admin:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.get("/durable/login")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                    await anyio.sleep(0.1)
            run_id = (await client.post("/greetings", json={"name": "ann"})).json()["run_id"]
            headers = {"authorization": f"Bearer {TOKEN}"}
            with anyio.fail_after(15):
                while True:
                    run = (await client.get(f"/durable/api/runs/{run_id}", headers=headers)).json()
                    if run["status"] == "completed":
                        break
                    await anyio.sleep(0.1)
            assert run["result"] == {"hello": "hello, ann"}
            assert (await client.get("/durable/api/runs")).status_code == 401
            page = await client.get(f"/durable/runs/{run_id}", headers=headers)
            assert page.status_code == 200
            assert "hello" in page.text
            metrics = await client.get("/durable/metrics", headers=headers)
            assert 'durable_runs{status="completed",workflow="greet"} 1.0' in metrics.text
            (worker,) = (await client.get("/durable/api/workers", headers=headers)).json()[
                "workers"
            ]
            assert worker["workflows"] == ["greet"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert TOKEN not in output  # uvicorn's access log and durable's logs
