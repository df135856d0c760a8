"""The `durable` console script, run as a real subprocess against a real database."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import durable
from durable.server import LocalPostgres

pytestmark = pytest.mark.timeout(120)

UNREACHABLE = "postgresql://u:secret@127.0.0.1:1/x"


class Database(Protocol):
    """The `db` fixture of tests/conftest.py: a fresh, migrated database."""

    name: str
    dsn: str


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def _console_script() -> str:
    beside = Path(sys.executable).parent / "durable"
    if beside.exists():
        return str(beside)
    found = shutil.which("durable")
    assert found, "the `durable` console script is not installed (pip install -e '.[dev]')"
    return found


DURABLE = _console_script()


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DURABLE_DSN"}
    extra = dict(extra or {})
    if "PYTHONPATH" in extra and os.environ.get("PYTHONPATH"):
        # The app's directory first, then the caller's path: the command must run the
        # checkout under test (PYTHONPATH=... pytest), not whichever one is installed.
        extra["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    env.update(extra)
    return env


async def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> Result:
    """Run `durable ARGS...` and capture its exit code and output."""
    with anyio.fail_after(timeout):
        done = await anyio.run_process([DURABLE, *args], env=_env(env), check=False)
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def assert_clean_error(result: Result, code: int, *needles: str) -> None:
    """A user-facing failure: the expected code, one clear message, no traceback."""
    assert result.code == code, result
    assert "Traceback" not in result.err, result.err
    for needle in needles:
        assert needle.lower() in result.err.lower(), result.err


# -- workflows used by the tests ------------------------------------------------------------


def echo_workflow(name: str = "cli_echo") -> durable.Workflow:
    """Two steps; `second` fails on its first attempt so the timeline has a retry."""
    wf = durable.Workflow(name)

    async def first(ctx: durable.Context) -> dict[str, Any]:
        return {"n": ctx.input.get("n", 0)}

    async def second(ctx: durable.Context) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"doubled": 2 * ctx.results["first"]["n"]}

    wf.step("first", first)
    wf.step("second", second, backoff=0.05)
    return wf


@pytest.fixture
async def engine(db: Database) -> AsyncIterator[durable.Engine]:
    eng = durable.Engine(db.dsn, workflows=[echo_workflow()], poll_interval=0.2)
    async with eng:
        yield eng


async def completed_runs(engine: durable.Engine, count: int) -> list[str]:
    ids = [await engine.start("cli_echo", {"n": i}) for i in range(count)]
    async with engine.worker(concurrency=4, poll_interval=0.1):
        for run_id in ids:
            await engine.wait(run_id, timeout=30)
    return ids


@pytest.fixture
async def empty_db(server_dsn: str) -> AsyncIterator[str]:
    """A database without durable's schema."""
    name = f"t_empty_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(server_dsn, name)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- basics ---------------------------------------------------------------------------------


async def test_help_lists_every_command() -> None:
    result = await cli("--help")
    assert result.code == 0
    for command in (
        "migrate",
        "worker",
        "runs",
        "signal",
        "cancel",
        "retry",
        "purge",
        "history",
        "demo",
        "check",
    ):
        assert command in result.out


async def test_version() -> None:
    result = await cli("--version")
    assert result.code == 0, result
    assert result.out.split()[:2] == ["durable", durable.__version__]


async def test_no_command_is_a_usage_error() -> None:
    result = await cli()
    assert result.code == 2
    assert "Traceback" not in result.err


async def test_no_dsn_says_how_to_give_one() -> None:
    result = await cli("runs", "list")
    assert_clean_error(result, 2, "--dsn", "DURABLE_DSN")


async def test_migrate_applies_once_then_is_a_no_op(empty_db: str) -> None:
    first = await cli("--dsn", empty_db, "migrate")
    assert first.code == 0, first
    assert "0001" in first.out
    again = await cli("migrate", env={"DURABLE_DSN": empty_db})  # the DSN from the env
    assert again.code == 0, again
    assert "up to date" in again.out
    as_json = await cli("--dsn", empty_db, "--json", "migrate")
    assert as_json.code == 0
    assert as_json.json() == {"schema": "durable", "applied": []}
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('durable.runs') IS NOT NULL")
    finally:
        await conn.close()


async def test_migrate_into_another_schema(empty_db: str) -> None:
    result = await cli("--dsn", empty_db, "--schema", "other_wf", "migrate")
    assert result.code == 0, result
    listed = await cli("--dsn", empty_db, "--schema", "other_wf", "runs", "list")
    assert listed.code == 0, listed
    assert "no runs" in listed.out


async def test_commands_on_an_unmigrated_database_say_to_migrate(empty_db: str) -> None:
    result = await cli("--dsn", empty_db, "runs", "list")
    assert_clean_error(result, 2, "durable migrate")


# -- runs -----------------------------------------------------------------------------------


async def test_runs_list_shows_a_table(engine: durable.Engine, db: Database) -> None:
    ids = await completed_runs(engine, 2)
    result = await cli("--dsn", db.dsn, "runs", "list")
    assert result.code == 0, result
    header = result.out.splitlines()[0]
    for column in ("ID", "WORKFLOW", "STATUS", "NODE", "PARENT", "CREATED", "UPDATED", "ERROR"):
        assert column in header
    for run_id in ids:
        line = next(ln for ln in result.out.splitlines() if ln.startswith(run_id))
        assert "cli_echo" in line
        assert "completed" in line
        # Times carry their UTC offset, so two operators in two zones read the same instant.
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", line), line


async def test_runs_list_shows_the_failed_node_the_error_and_the_parent(db: Database) -> None:
    child = durable.Workflow("cli_kid")

    @child.step
    async def kid(ctx: durable.Context) -> str:
        return "done"

    parent = durable.Workflow("cli_parent")
    parent.child_workflow("spawn", lambda ctx: ("cli_kid", {}))

    @parent.step
    async def boom(ctx: durable.Context) -> None:
        raise durable.NonRetryable("the warehouse is on fire")

    async with durable.Engine(db.dsn, workflows=[child, parent], poll_interval=0.2) as engine:
        run_id = await engine.start("cli_parent", {})
        async with engine.worker(poll_interval=0.1):
            with pytest.raises(durable.RunFailed):
                await engine.wait(run_id, timeout=30)
        [kid_id] = (await engine.get_run(run_id)).children
    result = await cli("--dsn", db.dsn, "runs", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    failed = next(ln for ln in lines if ln.startswith(run_id))
    assert "failed" in failed
    assert " boom " in failed
    assert "the warehouse is on fire" in failed
    kid_line = next(ln for ln in lines if ln.startswith(kid_id))
    assert run_id in kid_line  # the PARENT column


async def test_runs_list_filters_and_json(engine: durable.Engine, db: Database) -> None:
    ids = await completed_runs(engine, 3)
    pending = await engine.start("cli_echo", {"n": 99})
    # Global options are accepted after the subcommand too.
    result = await cli("runs", "list", "--json", "--dsn", db.dsn)
    assert result.code == 0, result
    rows = result.json()
    assert {r["id"] for r in rows} == {*ids, pending}
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert {r["status"] for r in rows if r["id"] in ids} == {"completed"}

    only = await cli("--dsn", db.dsn, "--json", "runs", "list", "--status", "pending")
    assert [r["id"] for r in only.json()] == [pending]
    limited = await cli("--dsn", db.dsn, "--json", "runs", "list", "--limit", "2")
    assert len(limited.json()) == 2
    other = await cli("--dsn", db.dsn, "runs", "list", "--workflow", "nope")
    assert other.code == 0
    assert "no runs" in other.out
    bad = await cli("--dsn", db.dsn, "runs", "list", "--status", "sleeping")
    assert bad.code == 2


async def test_runs_show_prints_the_timeline(engine: durable.Engine, db: Database) -> None:
    [run_id] = await completed_runs(engine, 1)
    result = await cli("--dsn", db.dsn, "runs", "show", run_id)
    assert result.code == 0, result
    assert run_id in result.out
    assert "completed" in result.out
    lines = result.out.splitlines()
    timeline = lines[lines.index(next(ln for ln in lines if ln.startswith("timeline"))) + 1 :]
    keys = [ln.split()[2] for ln in timeline]  # "+12 ms  first  completed ..."
    assert keys == ["first", "second", "second"]
    assert "retried" in timeline[1]
    assert "RuntimeError: first attempt fails" in timeline[1]
    assert "completed" in timeline[2]
    assert "attempt 2" in timeline[2]


async def test_runs_show_json(engine: durable.Engine, db: Database) -> None:
    [run_id] = await completed_runs(engine, 1)
    result = await cli("--dsn", db.dsn, "--json", "runs", "show", run_id)
    assert result.code == 0, result
    data = result.json()
    assert data["id"] == run_id
    assert data["status"] == "completed"
    # The completed run's result is `results`; it is not repeated as `result`.
    assert data["results"] == {"first": {"n": 0}, "second": {"doubled": 0}}
    assert "result" not in data
    assert [e["key"] for e in data["journal"]] == ["first", "second"]
    assert data["journal"][1]["attempts"] == 2
    assert [(a["key"], a["attempt"]) for a in data["attempts"]] == [("second", 1)]


async def test_runs_show_of_an_unknown_id(db: Database) -> None:
    result = await cli("--dsn", db.dsn, "runs", "show", "01NOSUCHRUN")
    assert_clean_error(result, 2, "no run", "01NOSUCHRUN")
    assert result.out == ""


# -- cancel ---------------------------------------------------------------------------------


async def test_cancel_a_finished_run_is_not_done(engine: durable.Engine, db: Database) -> None:
    [run_id] = await completed_runs(engine, 1)
    result = await cli("--dsn", db.dsn, "cancel", run_id)
    assert result.code == 1, result
    assert "completed" in result.out
    as_json = await cli("--dsn", db.dsn, "--json", "cancel", run_id)
    assert as_json.code == 1
    assert as_json.json()["cancelled"] is False
    assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPLETED


async def test_cancel_a_pending_run(engine: durable.Engine, db: Database) -> None:
    run_id = await engine.start("cli_echo", {"n": 1})  # no worker: it stays pending
    result = await cli("--dsn", db.dsn, "cancel", run_id)
    assert result.code == 0, result
    # Nothing to compensate: the run is cancelled at once, and the output says just that.
    assert (await engine.get_run(run_id)).status is durable.RunStatus.CANCELLED
    assert f"run {run_id} cancelled" in result.out
    assert "being cancelled" not in result.out
    assert "compensates" not in result.out
    again = await cli("--dsn", db.dsn, "cancel", run_id)
    assert again.code == 1, again
    assert "already cancelled" in again.out


async def test_cancel_a_run_with_completed_steps_says_it_compensates(db: Database) -> None:
    wf = durable.Workflow("cli_hold")

    async def undo(ctx: durable.Context) -> None:
        return None

    @wf.step(compensate=undo)
    async def take(ctx: durable.Context) -> str:
        return "taken"

    wf.wait_for_signal("go", "go")
    async with durable.Engine(db.dsn, workflows=[wf]) as engine:
        run_id = await engine.start("cli_hold", {})
        async with engine.worker(poll_interval=0.1):
            with anyio.fail_after(30):
                while (await engine.get_run(run_id)).status is not durable.RunStatus.WAITING:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        # No worker now: the run stays `compensating` until one takes the compensation.
        result = await cli("--dsn", db.dsn, "cancel", run_id)
        assert result.code == 0, result
        assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPENSATING
        assert "is being cancelled (status compensating)" in result.out
        async with engine.worker(poll_interval=0.1):
            with pytest.raises(durable.RunCancelled):
                await engine.wait(run_id, timeout=30)


async def test_cancel_an_unknown_run(db: Database) -> None:
    result = await cli("--dsn", db.dsn, "cancel", "01NOSUCHRUN")
    assert_clean_error(result, 2, "no run")


# -- user mistakes and an unreachable database ----------------------------------------------


async def test_signal_with_bad_json_is_a_usage_error(db: Database) -> None:
    result = await cli("--dsn", db.dsn, "signal", "01ANYRUN", "approved", "{not json")
    assert_clean_error(result, 2, "JSON")


async def test_signal_with_an_empty_name_is_a_usage_error(db: Database) -> None:
    result = await cli("--dsn", db.dsn, "signal", "01ANYRUN", "")
    assert_clean_error(result, 2, "signal name")


@pytest.mark.parametrize("duration", ["soon", "30", "-5d", "3y", ""])
async def test_purge_with_a_bad_duration_is_a_usage_error(db: Database, duration: str) -> None:
    result = await cli("--dsn", db.dsn, "purge", "--older-than", duration)
    assert_clean_error(result, 2, "duration")


@pytest.mark.parametrize(
    "args",
    [
        ("migrate",),
        ("runs", "list"),
        ("runs", "show", "01ANYRUN"),
        ("cancel", "01ANYRUN"),
        ("--json", "runs", "list"),
    ],
)
async def test_unreachable_database_exits_3_without_the_password(args: tuple[str, ...]) -> None:
    for how in ("flag", "env"):
        if how == "flag":
            result = await cli("--dsn", UNREACHABLE, *args)
        else:
            result = await cli(*args, env={"DURABLE_DSN": UNREACHABLE})
        assert_clean_error(result, 3, "127.0.0.1:1")
        assert "secret" not in result.out + result.err
        assert "u:***@127.0.0.1:1/x" in result.err


@pytest.mark.parametrize(
    ("dsn", "needle"),
    [
        ("mysql://u:secret@127.0.0.1/x", "scheme"),
        ("postgresql://u:secret@127.0.0.1:notaport/x", "invalid DSN"),
        ("postgresql://u:secret@[::1/x", "invalid DSN"),
    ],
)
async def test_a_malformed_dsn_is_a_configuration_error(dsn: str, needle: str) -> None:
    result = await cli("--dsn", dsn, "runs", "list")
    assert_clean_error(result, 2, needle)
    assert "secret" not in result.out + result.err


async def test_a_missing_database_or_role_is_a_configuration_error(db: Database) -> None:
    missing = with_database(db.dsn, "no_such_database_xyz")
    result = await cli("--dsn", missing, "runs", "list")
    assert_clean_error(result, 2, "no_such_database_xyz")
    host = urlsplit(db.dsn).netloc.rpartition("@")[2]
    nobody = urlunsplit(urlsplit(db.dsn)._replace(netloc=f"nobody_xyz@{host}"))
    result = await cli("--dsn", nobody, "runs", "list")
    assert_clean_error(result, 2, "nobody_xyz")


async def test_a_wrong_password_is_a_configuration_error() -> None:
    """A server of its own: the shared test server trusts every loopback connection."""
    try:
        server = LocalPostgres()
    except durable.DurableError as exc:
        pytest.skip(f"no local PostgreSQL binaries: {exc}")
    with server:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute("CREATE ROLE app LOGIN PASSWORD 'right-one'")
            (server.data_dir / "pg_hba.conf").write_text(
                "host all all 127.0.0.1/32 scram-sha-256\n"
            )
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        dsn = f"postgresql://app:wrong-one@127.0.0.1:{server.port}/postgres"
        result = await cli("--dsn", dsn, "runs", "list")
    assert_clean_error(result, 2, "password")
    assert "wrong-one" not in result.out + result.err


async def test_a_server_that_never_answers_times_out_with_a_reason() -> None:
    # Accepts TCP connections (the kernel completes the handshake) but never speaks.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        began = anyio.current_time()
        result = await cli("--dsn", f"postgresql://u:secret@127.0.0.1:{port}/x", "runs", "list")
        took = anyio.current_time() - began
    assert_clean_error(result, 3, "no answer within 10 s", f"127.0.0.1:{port}")
    assert took < 40, took  # the default connect timeout is 10 s, not asyncpg's 60 s


async def test_errors_are_json_under_json(db: Database) -> None:
    result = await cli("--dsn", db.dsn, "--json", "runs", "show", "01NOSUCHRUN")
    assert_clean_error(result, 2, "no run")
    error = result.json()["error"]
    assert error["exit_code"] == 2
    assert error["type"] == "RunNotFound"
    assert "01NOSUCHRUN" in error["message"]
    down = await cli("--dsn", UNREACHABLE, "--json", "runs", "list")
    assert down.code == 3
    assert down.json()["error"]["exit_code"] == 3
    assert "secret" not in down.out


async def test_password_in_a_query_parameter_is_not_printed() -> None:
    result = await cli("--dsn", "postgresql://u@127.0.0.1:1/x?password=hunter2", "runs", "list")
    assert_clean_error(result, 3)
    assert "hunter2" not in result.out + result.err


# -- worker ---------------------------------------------------------------------------------

APP = '''
"""A user's module: the engine `durable worker cli_app:engine` runs."""
import asyncio
import os

import durable

wf = durable.Workflow("cli_app")


@wf.step
async def record(ctx: durable.Context) -> dict:
    await asyncio.sleep(ctx.input.get("nap", 0))
    await ctx.conn.execute(
        "INSERT INTO cli_effects (run_id, pid) VALUES ($1, $2)", ctx.run_id, os.getpid()
    )
    return {"pid": os.getpid(), "echo": ctx.input.get("echo")}


engine = durable.Engine(os.environ["CLI_APP_DSN"], workflows=[wf], poll_interval=0.2)


def make_engine() -> durable.Engine:
    return durable.Engine(os.environ["CLI_APP_DSN"], workflows=[wf], poll_interval=0.2)


def main() -> None:
    """The application's entry point: `durable worker cli_app:main` must never call it."""
    open(os.environ["CLI_APP_MARKER"], "w").close()


# The definition of the test's `cli_echo` workflow, for `durable start`; the test process
# runs its worker.
echo = durable.Workflow("cli_echo")
echo.step("first", record)
echo.step("second", record)
echo_engine = durable.Engine(os.environ["CLI_APP_DSN"], workflows=[wf, echo])

not_an_engine = 42
'''

BROKEN_APP = """
import durable

raise RuntimeError("kaboom while importing")
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "broken_app.py").write_text(textwrap.dedent(BROKEN_APP))
    return tmp_path


def _app_workflow() -> durable.Workflow:
    """The same workflow name, so the test process can start runs for the worker."""
    wf = durable.Workflow("cli_app")

    async def record(ctx: durable.Context) -> None:
        raise AssertionError("runs only in the worker process")

    wf.step("record", record)
    return wf


@pytest.mark.parametrize(
    ("target", "stop_with"),
    [("cli_app:engine", signal.SIGTERM), ("cli_app:make_engine", signal.SIGINT)],
)
async def test_worker_runs_jobs_and_stops_gracefully(
    db: Database, app_dir: Path, target: str, stop_with: signal.Signals
) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        await conn.execute("CREATE TABLE cli_effects (run_id text NOT NULL, pid int NOT NULL)")
    finally:
        await conn.close()
    log_path = app_dir / "worker.log"
    env = _env({"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir)})
    with log_path.open("wb") as log_file:
        proc = await anyio.open_process(
            [DURABLE, "worker", target, "--concurrency", "2"],
            env=env,
            cwd=app_dir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with durable.Engine(db.dsn, workflows=[_app_workflow()]) as engine:
            run_id = await engine.start("cli_app", {"echo": "hi"})
            result = await engine.wait(run_id, timeout=30)
            assert result["record"] == {"pid": proc.pid, "echo": "hi"}
            with anyio.fail_after(10):  # signal handlers are installed once it says so
                while "durable worker ready" not in log_path.read_text():  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            # A job in flight when the signal comes finishes before the worker exits.
            slow = await engine.start("cli_app", {"echo": "slow", "nap": 3})

            async def in_flight() -> bool:  # the worker holds the slow run's job
                async with engine.pool.acquire() as c, c.transaction():
                    free = await c.fetchval(
                        "SELECT count(*) FROM (SELECT 1 FROM durable.jobs WHERE run_id = $1 "
                        "FOR UPDATE SKIP LOCKED) j",
                        slow,
                    )
                    held = await c.fetchval(
                        "SELECT count(*) FROM durable.jobs WHERE run_id = $1", slow
                    )
                return bool(held and not free)

            with anyio.fail_after(10):
                while not await in_flight():  # noqa: ASYNC110 - polling the database
                    await anyio.sleep(0.02)
            proc.send_signal(stop_with)
            assert (await engine.wait(slow, timeout=30))["record"]["echo"] == "slow"
        with anyio.fail_after(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
    log = log_path.read_text()
    assert proc.returncode == 0, log
    assert "stopping gracefully" in log
    assert log.index("stopping gracefully") < log.index(f"run {slow} completed"), log
    assert "Traceback" not in log
    conn = await asyncpg.connect(db.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM cli_effects") == 2
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("cli_app", "MODULE:ENGINE"),
        ("cli_app:", "MODULE:ENGINE"),
        ("no_such_module_xyz:engine", "cannot import module 'no_such_module_xyz'"),
        ("cli_app:missing", "no attribute 'missing'"),
        ("cli_app:not_an_engine", "not a durable.Engine"),
        ("cli_app:main", "not an engine factory, so it was not called"),
        ("cli_app.py:engine", "try cli_app:engine"),
        ("./cli_app.py:engine", "try cli_app:engine"),
        ("broken_app:engine", "kaboom while importing"),
    ],
)
async def test_worker_with_a_bad_target(
    db: Database, app_dir: Path, target: str, needle: str
) -> None:
    marker = app_dir / "main-was-called"
    env = {"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir), "CLI_APP_MARKER": str(marker)}
    result = await cli("worker", target, env=env)
    assert_clean_error(result, 2, needle)
    assert not marker.exists(), "the user's main() was called"


async def test_an_import_error_shows_its_traceback_under_debug(app_dir: Path) -> None:
    env = {"CLI_APP_DSN": UNREACHABLE, "PYTHONPATH": str(app_dir)}
    quiet = await cli("worker", "broken_app:engine", env=env)
    assert_clean_error(quiet, 2, "kaboom", "--log-level debug")
    loud = await cli("--log-level", "debug", "worker", "broken_app:engine", env=env)
    assert loud.code == 2, loud
    assert "Traceback" in loud.err
    assert 'raise RuntimeError("kaboom while importing")' in loud.err


async def test_worker_no_migrate_on_an_unmigrated_database_exits_2(
    empty_db: str, app_dir: Path
) -> None:
    env = {"CLI_APP_DSN": empty_db, "PYTHONPATH": str(app_dir)}
    result = await cli("worker", "cli_app:engine", "--no-migrate", env=env, timeout=30)
    assert_clean_error(result, 2, "run `durable migrate` first")
    assert "ready" not in result.err


async def test_worker_with_an_unreachable_database(app_dir: Path) -> None:
    env = {"CLI_APP_DSN": UNREACHABLE, "PYTHONPATH": str(app_dir)}
    result = await cli("worker", "cli_app:engine", env=env)
    assert_clean_error(result, 3, "127.0.0.1:1")
    assert "secret" not in result.out + result.err


# -- signal, retry, purge (once the engine has them) ----------------------------------------

needs_signal = pytest.mark.skipif(
    not hasattr(durable.Engine, "signal") or not hasattr(durable.Workflow, "wait_for_signal"),
    reason="Engine.signal / Workflow.wait_for_signal not implemented yet",
)
needs_retry = pytest.mark.skipif(
    not hasattr(durable.Engine, "retry"), reason="Engine.retry not implemented yet"
)
needs_purge = pytest.mark.skipif(
    not hasattr(durable.Engine, "purge"), reason="Engine.purge not implemented yet"
)


@needs_signal
async def test_signal_wakes_a_waiting_run(db: Database) -> None:
    wf = durable.Workflow("cli_approval")
    wf.wait_for_signal("approval", "approved")  # type: ignore[attr-defined]
    async with durable.Engine(db.dsn, workflows=[wf]) as engine:
        run_id = await engine.start("cli_approval", {})
        async with engine.worker(poll_interval=0.1):
            result = await cli("--dsn", db.dsn, "signal", run_id, "approved", '{"by": "ann"}')
            assert result.code == 0, result
            final = await engine.wait(run_id, timeout=30)
        assert final["approval"] == {"by": "ann"}
        late = await cli("--dsn", db.dsn, "--json", "signal", run_id, "approved")
        assert late.code == 1, late
        assert late.json()["recorded"] is False
    unknown = await cli("--dsn", db.dsn, "signal", "01NOSUCHRUN", "approved")
    assert_clean_error(unknown, 2, "no run")


async def test_signal_with_a_dedupe_key_is_recorded_once(db: Database) -> None:
    wf = durable.Workflow("cli_dedupe")
    wf.wait_for_signal("paid", "paid")
    async with durable.Engine(db.dsn, workflows=[wf]) as engine:
        run_id = await engine.start("cli_dedupe", {})
        for _ in range(2):
            sent = await cli("--dsn", db.dsn, "signal", run_id, "paid", "1", "--dedupe-key", "e1")
            assert sent.code == 0, sent
        async with engine.pool.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM durable.signals WHERE run_id = $1", run_id
            )
    assert n == 1


@needs_retry
async def test_retry_re_runs_a_failed_run(db: Database) -> None:
    wf = durable.Workflow("cli_gate")

    async def gate(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        if not await ctx.conn.fetchval("SELECT count(*) FROM cli_gate_open"):
            raise durable.NonRetryable("the gate is closed")
        return "through"

    wf.step("gate", gate)
    async with durable.Engine(db.dsn, workflows=[wf]) as engine:
        async with engine.pool.acquire() as conn:
            await conn.execute("CREATE TABLE cli_gate_open (x int)")
        run_id = await engine.start("cli_gate", {})
        async with engine.worker(poll_interval=0.1):
            with pytest.raises(durable.RunFailed):
                await engine.wait(run_id, timeout=30)
            async with engine.pool.acquire() as conn:
                await conn.execute("INSERT INTO cli_gate_open VALUES (1)")
            result = await cli("--dsn", db.dsn, "retry", run_id)
            assert result.code == 0, result
            assert await engine.wait(run_id, timeout=30) == {"gate": "through"}
        again = await cli("--dsn", db.dsn, "--json", "retry", run_id)
        assert again.code == 1, again
        assert again.json()["retried"] is False
    unknown = await cli("--dsn", db.dsn, "retry", "01NOSUCHRUN")
    assert_clean_error(unknown, 2, "no run")


@needs_purge
async def test_purge_deletes_old_finished_runs(engine: durable.Engine, db: Database) -> None:
    [run_id] = await completed_runs(engine, 1)
    kept = await cli("--dsn", db.dsn, "--json", "purge", "--older-than", "30d")
    assert kept.code == 0, kept
    assert kept.json()["purged"] == 0
    # Skip time instead of sleeping: new sessions of this database (the CLI's) see the
    # database clock five seconds ahead (durable.now_v1).
    async with engine.pool.acquire() as c:
        await c.execute(f"ALTER DATABASE \"{db.name}\" SET durable.clock_offset = '5'")
    purged = await cli("--dsn", db.dsn, "purge", "--older-than", "1s")
    assert purged.code == 0, purged
    assert "purged 1" in purged.out
    gone = await cli("--dsn", db.dsn, "runs", "show", run_id)
    assert gone.code == 2


# -- start ----------------------------------------------------------------------------------


async def test_start_and_wait_through_the_app_engine(
    engine: durable.Engine, db: Database, app_dir: Path
) -> None:
    env = {"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir)}
    async with engine.worker(poll_interval=0.1):  # serves cli_echo with the test's handlers
        done = await cli(
            "start", "cli_echo", '{"n": 21}', "--app", "cli_app:echo_engine", "--wait", env=env
        )
        assert done.code == 0, done
        assert "completed" in done.out
        assert '"doubled": 42' in done.out
        from_env = {**env, "DURABLE_APP": "cli_app:echo_engine"}
        as_json = await cli("--json", "start", "cli_echo", '{"n": 2}', "--wait", env=from_env)
        assert as_json.code == 0, as_json
        data = as_json.json()
        assert data["status"] == "completed"
        assert data["results"]["second"] == {"doubled": 4}
    # Without --wait: the run id, and the same one again for the same idempotency key.
    args = ("start", "cli_echo", '{"n": 1}', "--app", "cli_app:echo_engine")
    first = await cli(*args, "--idempotency-key", "k-1", env=env)
    second = await cli(*args, "--idempotency-key", "k-1", env=env)
    assert first.code == second.code == 0, (first, second)
    assert first.out.strip() == second.out.strip()
    assert (await engine.get_run(first.out.strip())).input == {"n": 1}


async def test_start_wait_without_a_worker_is_not_done(db: Database, app_dir: Path) -> None:
    env = {"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir)}
    result = await cli(
        "start", "cli_echo", "--app", "cli_app:echo_engine", "--wait", "--timeout", "1", env=env
    )
    assert result.code == 1, result
    assert "still pending after 1 s" in result.out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("start", "cli_echo"), "--app MODULE:ENGINE"),
        (("start", "cli_echo", "[1, 2]", "--app", "cli_app:echo_engine"), "JSON object"),
        (("start", "cli_echo", "{nope", "--app", "cli_app:echo_engine"), "not valid JSON"),
        (("start", "nope", "--app", "cli_app:echo_engine"), "registers: cli_app, cli_echo"),
    ],
)
async def test_start_mistakes_are_usage_errors(
    db: Database, app_dir: Path, args: tuple[str, ...], needle: str
) -> None:
    result = await cli(*args, env={"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir)})
    assert_clean_error(result, 2, needle)


async def test_a_dsn_the_engine_overrides_is_reported(
    engine: durable.Engine, db: Database, app_dir: Path
) -> None:
    env = {"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(app_dir)}
    other = "postgresql://someone:hunter2@127.0.0.1:1/elsewhere"
    result = await cli("--dsn", other, "start", "cli_echo", "--app", "cli_app:echo_engine", env=env)
    assert result.code == 0, result
    assert "--dsn postgresql://someone:***@127.0.0.1:1/elsewhere is ignored" in result.err
    assert "cli_app:echo_engine uses its DSN" in result.err
    assert "hunter2" not in result.err
    assert (await engine.get_run(result.out.strip())).workflow == "cli_echo"
    from_env = await cli(
        "start", "cli_echo", "--app", "cli_app:echo_engine", env={**env, "DURABLE_DSN": other}
    )
    assert from_env.code == 0, from_env
    assert "$DURABLE_DSN postgresql://someone:***@" in from_env.err


# -- versions: check and runs upgrade --------------------------------------------------------

VERSIONS_APP = """
import os

import durable


async def step(ctx):
    return f"{ctx.node} v{ctx.input.get('v', '?')}"


def build(version, *names):
    wf = durable.Workflow("order", version=version)
    for name in names:
        if name == "wait":
            wf.wait_for_signal("wait", "go")
        else:
            wf.step(name, step)
    return wf


DSN = os.environ["CLI_APP_DSN"]
both = durable.Engine(DSN, workflows=[build(1, "a", "wait", "c"), build(2, "a", "wait", "c", "d")])
new = durable.Engine(DSN, workflows=[build(2, "a", "wait", "c", "d")])
misfit = durable.Engine(DSN, workflows=[build(2, "wait", "c")])
"""


def _order(version: int, *names: str) -> durable.Workflow:
    wf = durable.Workflow("order", version=version)
    for name in names:
        if name == "wait":
            wf.wait_for_signal("wait", "go")
        else:

            async def step(ctx: durable.Context) -> str:
                return f"{ctx.node} here"

            wf.step(name, step)
    return wf


async def test_check_and_runs_upgrade_gate_and_move_a_deploy(db: Database, tmp_path: Path) -> None:
    """`durable check` exits 0 when the code serves every unfinished run and 1, grouped by
    cause, when not; `durable runs upgrade` moves what fits (exit 0), refuses what does not
    (exit 1, with reasons), and changes nothing with --dry-run."""
    (tmp_path / "versions_app.py").write_text(VERSIONS_APP)
    env = {"CLI_APP_DSN": db.dsn, "PYTHONPATH": str(tmp_path)}
    v1 = _order(1, "a", "wait", "c")
    async with durable.Engine(db.dsn, workflows=[v1]) as engine, engine.worker():
        ids = sorted([await engine.start(v1, {}) for _ in range(2)])
        with anyio.fail_after(10):
            while {(await engine.get_run(r)).status.value for r in ids} != {"waiting"}:  # noqa: ASYNC110
                await anyio.sleep(0.05)

    ok = await cli("check", "versions_app:both", env=env)
    assert ok.code == 0, ok
    assert "ok: this code can continue all 2 unfinished run(s)" in ok.out

    stranded = await cli("check", "versions_app:new", env=env)
    assert stranded.code == 1, stranded
    assert "not ok: 2 of 2 unfinished run(s) cannot be continued by this code" in stranded.out
    assert "version not registered" in stranded.out
    assert f"order version 1: 2 run(s) on queue {v1.queue}" in stranded.out
    assert ", ".join(ids) in stranded.out
    as_json = await cli("--json", "check", "versions_app:new", env=env)
    assert as_json.code == 1, as_json
    report = as_json.json()
    assert (report["ok"], report["unfinished"], report["stranded"]) == (False, 2, 2)
    (group,) = report["causes"]["unknown_version"]
    assert (group["workflow"], group["version"], group["run_ids"]) == ("order", 1, ids)

    refused = await cli(
        "runs", "upgrade", "order", "--from", "1", "--app", "versions_app:misfit", env=env
    )
    assert refused.code == 1, refused
    assert "moved 0 run(s) of order from version 1 to version 2; refused 2" in refused.out
    assert f"{ids[0]}: journaled node 'a' is not declared by version 2" in refused.out

    dry = await cli(
        "--json", "runs", "upgrade", "order", "--from", "1", "--app", "versions_app:new",
        "--dry-run", env=env,
    )  # fmt: skip
    assert dry.code == 0, dry
    assert dry.json()["dry_run"] is True
    assert dry.json()["moved_ids"] == ids
    assert (await cli("check", "versions_app:new", env=env)).code == 1  # nothing moved

    unknown = await cli(
        "runs", "upgrade", "order", "--from", "1", "--to", "5", "--app", "versions_app:new",
        env=env,
    )  # fmt: skip
    assert_clean_error(unknown, 2, "version 5 is not registered")

    moved = await cli(
        "runs", "upgrade", "order", "--from", "1", "--to", "2", "--app", "versions_app:new",
        env=env,
    )  # fmt: skip
    assert moved.code == 0, moved
    assert "moved 2 run(s) of order from version 1 to version 2; refused 0" in moved.out
    assert (await cli("check", "versions_app:new", env=env)).code == 0

    listed = await cli("--dsn", db.dsn, "--json", "runs", "list", "--workflow-version", "2")
    assert listed.code == 0, listed
    assert sorted(r["id"] for r in listed.json()) == ids
    assert {r["version"] for r in listed.json()} == {2}

    started = await cli(
        "start", "order", "--app", "versions_app:both", "--workflow-version", "1", env=env
    )
    assert started.code == 0, started
    async with durable.Engine(db.dsn) as engine:
        assert (await engine.get_run(started.out.strip())).version == 1
