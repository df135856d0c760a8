"""The `durable runs pause|resume|fork|bulk` verbs, through `durable.cli.main`."""

from __future__ import annotations

import io
import json
from typing import Any

import anyio

import durable
from durable.cli import main
from tests.integration.helpers import open_engine
from tests.integration.test_run_actions import order


async def cli(db: Any, *argv: str) -> tuple[int, Any]:
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(lambda: main(["--dsn", db.dsn, "--json", *argv], out))
    return code, json.loads(out.getvalue()) if out.getvalue() else None


async def test_pause_resume_fork_and_bulk_from_the_command_line(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        code, body = await cli(db, "runs", "pause", run_id)
        assert (code, body["paused"], body["status"]) == (0, True, "pending")
        assert (await cli(db, "runs", "pause", run_id))[0] == 1  # paused already
        code, body = await cli(db, "runs", "resume", run_id)
        assert (code, body["resumed"]) == (0, True)
        assert (await cli(db, "runs", "resume", run_id))[0] == 1

        code, body = await cli(
            db, "runs", "fork", run_id, "--from-node", "reserve", "--input", '{"sku": "B2"}'
        )
        assert code == 0
        fork = await engine.get_run(body["run_id"])
        assert (fork.forked_from, fork.input) == (run_id, {"sku": "B2"})
        code, body = await cli(db, "runs", "fork", run_id, "--from-node", "nope")
        assert code == 2
        assert "no node 'nope'" in body["error"]["message"]
        assert (await cli(db, "runs", "fork", run_id, "--input", "[1]"))[0] == 2

        assert (await cli(db, "runs", "bulk", "cancel"))[0] == 2  # no filter
        code, body = await cli(db, "runs", "bulk", "cancel", "--workflow", "order", "--dry-run")
        assert (code, sorted(body["runs"])) == (0, sorted([run_id, fork.id]))
        assert (await engine.get_run(run_id)).status is durable.RunStatus.PENDING
        code, body = await cli(db, "runs", "bulk", "cancel", "--status", "pending")
        assert (code, sorted(body["runs"])) == (0, sorted([run_id, fork.id]))
        assert (await engine.get_run(fork.id)).status is durable.RunStatus.CANCELLED
        code, body = await cli(db, "runs", "bulk", "retry", "--workflow", "order")
        assert (code, body["runs"]) == (0, [])


async def test_dashboard_refuses_to_serve_without_a_token_or_off_loopback(
    db: Any, monkeypatch: Any
) -> None:
    monkeypatch.delenv("DURABLE_ADMIN_TOKEN", raising=False)
    code, body = await cli(db, "dashboard")
    assert code == 2
    assert "DURABLE_ADMIN_TOKEN" in body["error"]["message"]
    code, body = await cli(db, "dashboard", "--insecure-no-auth", "--host", "0.0.0.0")
    assert code == 2
    assert "loopback" in body["error"]["message"]
