"""`durable schedules list|trigger|pause|resume`, run as real subprocesses."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_cli import Database, assert_clean_error, cli

pytestmark = pytest.mark.timeout(120)

APP = '''
"""A user's module declaring one schedule."""
import os

import durable

wf = durable.Workflow("sched_app")


@wf.step
async def make(ctx: durable.Context) -> str:
    return ctx.input["scheduled_at"]


engine = durable.Engine(
    os.environ["CLI_APP_DSN"],
    workflows=[wf],
    schedules=[
        durable.Schedule(
            "nightly", cron="0 3 * * *", workflow=wf, input={"kind": "daily"},
            timezone="Europe/Paris",
        )
    ],
)
'''


@pytest.fixture
def app_env(db: Database, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sched_app.py").write_text(textwrap.dedent(APP))
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"CLI_APP_DSN": db.dsn, "PYTHONPATH": path}


async def test_schedules_list_trigger_pause_resume(db: Database, app_env: dict[str, str]) -> None:
    empty = await cli("--dsn", db.dsn, "schedules", "list")
    assert empty.code == 0, empty
    assert "no schedules" in empty.out

    # trigger declares the schedule (through the app's engine) and starts a run now.
    first = await cli("schedules", "trigger", "nightly", "--app", "sched_app:engine", env=app_env)
    assert first.code == 0, first
    run_id = first.out.strip()
    assert len(run_id) == 26
    # No worker runs it, so it is still active: overlap="skip" starts nothing.
    again = await cli(
        "schedules", "trigger", "nightly", env={**app_env, "DURABLE_APP": "sched_app:engine"}
    )
    assert again.code == 1, again
    assert "previous run is still active" in again.out

    listed = await cli("--dsn", db.dsn, "schedules", "list")
    assert listed.code == 0, listed
    header, _, row = listed.out.splitlines()[:3]
    assert header.split()[:5] == ["NAME", "WORKFLOW", "CRON", "TZ", "STATE"]
    for cell in ("nightly", "sched_app", "0 3 * * *", "Europe/Paris", "active", run_id, "pending"):
        assert cell in row, row
    as_json = await cli("--dsn", db.dsn, "--json", "schedules", "list")
    assert as_json.code == 0, as_json
    (data,) = as_json.json()
    assert {k: data[k] for k in ("name", "cron", "timezone", "overlap", "catch_up")} == {
        "name": "nightly",
        "cron": "0 3 * * *",
        "timezone": "Europe/Paris",
        "overlap": "skip",
        "catch_up": "latest",
    }
    assert (data["paused"], data["last_run_id"], data["last_run_status"]) == (
        False,
        run_id,
        "pending",
    )
    assert data["input"] == {"kind": "daily"}
    assert data["next_at"].endswith(("T01:00:00+00:00", "T02:00:00+00:00"))  # 03:00 Paris

    paused = await cli("--dsn", db.dsn, "schedules", "pause", "nightly")
    assert paused.code == 0, paused
    assert "paused" in paused.out
    twice = await cli("--dsn", db.dsn, "schedules", "pause", "nightly")
    assert twice.code == 1, twice
    assert "already paused" in twice.out
    shown: Any = (await cli("--dsn", db.dsn, "--json", "schedules", "list")).json()
    assert (shown[0]["paused"], shown[0]["next_at"]) == (True, None)
    assert "paused" in (await cli("--dsn", db.dsn, "schedules", "list")).out

    resumed = await cli("--dsn", db.dsn, "schedules", "resume", "nightly")
    assert resumed.code == 0, resumed
    assert "resumed, next tick" in resumed.out
    not_paused = await cli("--dsn", db.dsn, "--json", "schedules", "resume", "nightly")
    assert not_paused.code == 1, not_paused
    assert not_paused.json()["resumed"] is False


async def test_schedules_errors_are_clean(db: Database, app_env: dict[str, str]) -> None:
    unknown = await cli("--dsn", db.dsn, "schedules", "pause", "nope")
    assert_clean_error(unknown, 2, "no schedule named 'nope'")
    no_app = await cli("--dsn", db.dsn, "schedules", "trigger", "nightly")
    assert_clean_error(no_app, 2, "--app MODULE:ENGINE", "DURABLE_APP")
    undeclared = await cli("schedules", "trigger", "nope", "--app", "sched_app:engine", env=app_env)
    assert_clean_error(undeclared, 2, "not declared by this engine (declared: nightly)")
    help_text = await cli("schedules", "--help")
    assert help_text.code == 0
    for action in ("list", "trigger", "pause", "resume"):
        assert action in help_text.out
