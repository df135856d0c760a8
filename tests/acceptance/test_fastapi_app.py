"""Acceptance: `examples/fastapi_app.py` under a real uvicorn server, driven over HTTP.

Each test runs `python -m uvicorn examples.fastapi_app:app` as a subprocess (cwd: the
repository root) against a fresh database and talks to it with httpx. The restart test
stops servers with SIGTERM while a run waits for its signal and while a step is in flight
(its INSERT blocked on a table lock the test holds), and checks that the next server
finishes the run with every step's effect written exactly once; another lets the blocked
step commit within the grace period before the server exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import asyncpg
import httpx
import pytest

import durable

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
RUN_TIMEOUT = 20.0
UVICORN = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"]


class Database(Protocol):
    """The `db` fixture of tests/conftest.py: a fresh, migrated database."""

    dsn: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One uvicorn process serving the example app; its output goes to `log_path`."""

    proc: anyio.abc.Process
    log_path: Path
    client: httpx.AsyncClient

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        """SIGTERM, then wait (with a deadline) for the process to exit; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(STOP_TIMEOUT):
            return await self.proc.wait()

    def assert_stopped_gracefully(self, code: int) -> None:
        """The lifespan's shutdown ran to completion and nothing raised.

        Since 0.29 uvicorn re-raises the signal it caught once its graceful shutdown is
        done (cooperative signal handling, encode/uvicorn#1600), so a clean SIGTERM stop
        exits by that signal (-15 here, 143 in a shell); earlier versions exit 0.
        """
        log = self.log
        assert code in (0, -signal.SIGTERM), f"uvicorn exited with {code}:\n{log}"
        assert "Application shutdown complete." in log, log
        assert f"Finished server process [{self.proc.pid}]" in log, log
        assert "Traceback" not in log, log


@asynccontextmanager
async def uvicorn(
    dsn: str, tmp_path: Path, name: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[Server]:
    """Start the app under uvicorn, wait until it answers, kill it on the way out."""
    port = _free_port()
    log_path = tmp_path / f"{name}.log"
    full_env = {**os.environ, "DURABLE_DSN": dsn, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [*UVICORN, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            server = Server(proc, log_path, client)
            with anyio.fail_after(READY_TIMEOUT):
                while True:
                    if proc.returncode is not None:
                        pytest.fail(f"uvicorn exited with {proc.returncode}:\n{server.log}")
                    try:
                        if (await client.get("/openapi.json")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)
            yield server
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.CancelScope(shield=True):
            await proc.wait()


async def poll_run(
    client: httpx.AsyncClient, run_id: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """GET the run until `until(body)` holds (deadline RUN_TIMEOUT); the last body."""
    body: dict[str, Any] = {}
    with anyio.fail_after(RUN_TIMEOUT):
        while True:
            response = await client.get(f"/runs/{run_id}")
            assert response.status_code == 200, response.text
            body = response.json()
            if until(body):
                return body
            assert body["status"] not in ("failed", "cancelled"), body
            await anyio.sleep(0.05)


def waiting_for_approval(body: dict[str, Any]) -> bool:
    return body["status"] == "waiting" and body["current_node"] == "approval"


def completed(body: dict[str, Any]) -> bool:
    return body["status"] == "completed"


async def effects(conn: asyncpg.Connection, run_id: str) -> dict[str, int]:
    """How many `order_events` rows each step of the run wrote."""
    rows = await conn.fetch(
        "SELECT step, count(*) AS n FROM order_events WHERE run_id = $1 GROUP BY step", run_id
    )
    return {r["step"]: r["n"] for r in rows}


async def test_order_lifecycle_over_http(db: Database, tmp_path: Path) -> None:
    async with uvicorn(db.dsn, tmp_path, "server") as server:
        client = server.client
        order = {"items": ["A1", "B2"]}
        response = await client.post("/orders", json=order, headers={"Idempotency-Key": "req-1"})
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        again = await client.post("/orders", json=order, headers={"Idempotency-Key": "req-1"})
        assert again.json() == {"run_id": run_id}

        body = await poll_run(client, run_id, waiting_for_approval)
        assert body["workflow"] == "order"
        assert body["results"] == {"reserve": {"reserved": 2}}
        assert body["result"] is None

        response = await client.post(f"/runs/{run_id}/signals/approved", json={"by": "ann"})
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": True}

        body = await poll_run(client, run_id, completed)
        expected = {
            "reserve": {"reserved": 2},
            "approval": {"by": "ann"},
            "ship": {"shipped": True, "approved_by": "ann"},
        }
        assert body["results"] == expected
        assert body["result"] == expected
        assert body["error"] is None

        unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        assert (await client.get(f"/runs/{unknown}")).status_code == 404
        response = await client.post(f"/runs/{unknown}/signals/approved", json={})
        assert response.status_code == 404, response.text
        response = await client.post(f"/runs/{run_id}/signals/approved", json={"by": "bob"})
        assert response.status_code == 409, response.text

        server.assert_stopped_gracefully(await server.stop())

    conn = await asyncpg.connect(db.dsn)
    try:
        assert await effects(conn, run_id) == {"reserve": 1, "ship": 1}
    finally:
        await conn.close()


async def test_client_mistakes_are_4xx_json_not_500(db: Database, tmp_path: Path) -> None:
    async with uvicorn(db.dsn, tmp_path, "server") as server:
        client = server.client
        started = await client.post("/orders", json={"items": ["A1"]})
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]

        # A body that is not JSON: refused before it reaches durable.
        plain = {"content-type": "text/plain"}
        response = await client.post("/orders", content=b"two keyboards", headers=plain)
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["detail"]
        response = await client.post(
            f"/runs/{run_id}/signals/approved", content=b"yes", headers=plain
        )
        assert response.status_code == 415, response.text

        # JSON that PostgreSQL cannot store (a NUL character): SerializationError -> 422.
        response = await client.post("/orders", json={"items": ["A\u0000"]})
        assert response.status_code == 422, response.text
        assert "NUL" in response.json()["detail"]
        response = await client.post(f"/runs/{run_id}/signals/approved", json={"by": "\u0000"})
        assert response.status_code == 422, response.text

        # An unknown run: RunNotFound -> 404, as JSON.
        unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        response = await client.post(f"/runs/{unknown}/signals/approved", json={})
        assert response.status_code == 404, response.text
        assert unknown in response.json()["detail"]

        # A signal without a body (payload None) is still fine.
        response = await client.post(f"/runs/{run_id}/signals/approved")
        assert response.status_code == 202, response.text
        assert "Traceback" not in server.log, server.log
        server.assert_stopped_gracefully(await server.stop())


@asynccontextmanager
async def ship_blocked(
    conn: asyncpg.Connection, server: Server, run_id: str
) -> AsyncIterator[None]:
    """Approve the run while holding a lock that blocks `ship`'s INSERT, so the step is in
    flight (its job claimed, its transaction open) until the block exits."""
    lock = conn.transaction()
    await lock.start()
    try:
        await conn.execute("LOCK TABLE order_events IN SHARE MODE")
        response = await server.client.post(f"/runs/{run_id}/signals/approved", json={"by": "ann"})
        assert response.status_code == 202, response.text
        with anyio.fail_after(RUN_TIMEOUT):
            while True:
                blocked = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                )
                if blocked:
                    break
                await anyio.sleep(0.05)
        body = (await server.client.get(f"/runs/{run_id}")).json()
        # A reader sees the run's last commit. `ship` runs in the transaction that
        # completed `approval` (a chain), so the run still reads as waiting there.
        assert (body["current_node"], body["status"]) == ("approval", "waiting"), body
        assert body["results"] == {"reserve": {"reserved": 1}}, body
        yield
    finally:
        await lock.rollback()  # releases the lock


async def start_order(server: Server) -> str:
    response = await server.client.post("/orders", json={"items": ["A1"]})
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    await poll_run(server.client, run_id, waiting_for_approval)
    return run_id


SHIPPED = {
    "reserve": {"reserved": 1},
    "approval": {"by": "ann"},
    "ship": {"shipped": True, "approved_by": "ann"},
}


async def test_sigterm_mid_run_then_restart_finishes_exactly_once(
    db: Database, tmp_path: Path
) -> None:
    # A short grace period: the blocked step below is released, not waited for.
    env = {"DURABLE_GRACE_PERIOD": "1"}

    # 1. Stopped while the run waits for its signal (no job in flight).
    async with uvicorn(db.dsn, tmp_path, "first", env) as server:
        run_id = await start_order(server)
        server.assert_stopped_gracefully(await server.stop())

    conn = await asyncpg.connect(db.dsn)
    try:
        # 2. Stopped while `ship` is in flight: its INSERT waits for our table lock.
        async with uvicorn(db.dsn, tmp_path, "second", env) as server:
            body = await poll_run(server.client, run_id, waiting_for_approval)
            assert body["results"] == {"reserve": {"reserved": 1}}
            async with ship_blocked(conn, server, run_id):
                server.assert_stopped_gracefully(await server.stop())
                assert "releasing 1 in-flight jobs" in server.log, server.log
                # The cancelled attempt rolled back: no journal entry, no effect row.
                assert await effects(conn, run_id) == {"reserve": 1}

        # 3. A new server picks the released job up and finishes the run.
        async with uvicorn(db.dsn, tmp_path, "third", env) as server:
            body = await poll_run(server.client, run_id, completed)
            assert body["result"] == SHIPPED
            server.assert_stopped_gracefully(await server.stop())

        assert await effects(conn, run_id) == {"reserve": 1, "ship": 1}
    finally:
        await conn.close()


async def test_sigterm_lets_in_flight_step_finish_within_grace_period(
    db: Database, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        async with uvicorn(db.dsn, tmp_path, "server", {"DURABLE_GRACE_PERIOD": "15"}) as server:
            run_id = await start_order(server)
            async with ship_blocked(conn, server, run_id):
                server.proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(STOP_TIMEOUT):  # the lifespan's shutdown has begun
                    while "Waiting for application shutdown." not in server.log:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                assert server.proc.returncode is None
            # The lock is gone: `ship` commits within the grace period, then the app exits.
            with anyio.fail_after(STOP_TIMEOUT):
                code = await server.proc.wait()
            server.assert_stopped_gracefully(code)
            assert "releasing" not in server.log, server.log

        async with durable.Engine(db.dsn) as engine:
            run = await engine.get_run(run_id)
        assert run.status is durable.RunStatus.COMPLETED, run
        assert run.result == SHIPPED
        assert await effects(conn, run_id) == {"reserve": 1, "ship": 1}
    finally:
        await conn.close()
