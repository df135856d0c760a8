"""The `durable` command: migrate a database, run a worker, inspect and steer runs, demo.

    durable [--dsn DSN] [--schema NAME] [--json] [--log-level L] COMMAND ...
    durable --version

    migrate                         apply pending migrations (idempotent)
    worker MODULE:ENGINE            run a worker for the engine defined in MODULE
    start WORKFLOW [JSON] --app MODULE:ENGINE [--idempotency-key K] [--wait]
                                    start a run (and wait for its result)
    check MODULE:ENGINE             can this code continue every unfinished run? (exit 1 if not)
    runs list [--status S] ...      list runs, newest first
    runs show ID                    a run and its journal as a timeline
                                    (both read a replica with --read-dsn)
    runs pause|resume ID            stop a run from being claimed / let it go on
    runs fork ID [--from-node N] [--input JSON]
                                    a new run from a node of ID, with another input
    runs bulk cancel|retry --status S --workflow W ... [--dry-run]
                                    cancel or retry every run a filter matches
    runs upgrade WORKFLOW --from N [--to M] --app MODULE:ENGINE [--dry-run]
                                    move unfinished runs to another version
    signal ID NAME [JSON]           send a signal (payload: a JSON value) to a run
                                    (--dedupe-key KEY: once per run for that key)
    cancel ID                       cancel a run (its completed steps are compensated)
    retry ID                        re-run a failed run from its failed node
    pause WORKFLOW                  stop workers claiming a workflow's jobs
    resume WORKFLOW                 let workers claim them again
    purge --older-than 30d          delete finished runs older than a duration
    history list                    the month partitions of runs and their history
    history drop --older-than 90d [--dry-run]
                                    drop whole months whose runs all finished before
    doctor [--json]                 check for stranded runs, old jobs, long transactions...
    dashboard [MODULE:ENGINE] [--host H] [--port P]
                                    serve the web dashboard, admin API and /metrics
    schedules list                  cron schedules: next tick, last run, paused or not
    schedules pause|resume NAME     stop / restart a schedule's ticks
    schedules trigger NAME --app MODULE:ENGINE
                                    start a run of a schedule now
    demo                            run the order-saga demo (starts its own PostgreSQL)

`--dsn` defaults to `$DURABLE_DSN`; `runs list` and `runs show` read from `--read-dsn`
(default `$DURABLE_READ_DSN`, a read replica that may lag) instead when one is given.
`worker` and `start` use the DSN of the engine MODULE defines; a different `--dsn` is
ignored with a warning that names both (passwords hidden).
MODULE:ENGINE names a `durable.Engine`, or a function without parameters annotated
`-> durable.Engine` (anything else is refused without being called).

Exit codes: 0 done; 1 the answer is "not done" (a cancel or signal that found the run
already finished, a retry of a run that had not failed, a `start --wait` whose run failed,
was cancelled or did not finish in time, a `check` that found runs this code cannot
continue, an `upgrade` that refused runs, a schedule already paused or not paused, a trigger
that overlap="skip" skipped, a pause of a paused workflow or a resume of one that was not);
2 a usage or configuration error, which retrying will not fix
(unknown run id or schedule, bad JSON, bad duration, bad MODULE:ENGINE, no DSN, a malformed
DSN or unsupported scheme, a wrong password or user, a missing database, an unmigrated
schema); 3 the database cannot be reached or does not answer (retrying later may work);
4 an unexpected internal error. With `--json` an error is also written to stdout as
`{"error": {"exit_code": N, "type": ..., "message": ...}}`. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from durable.cli.app import cmd_check, cmd_runs_upgrade, cmd_start, cmd_worker
from durable.cli.commands import (
    cmd_cancel,
    cmd_doctor,
    cmd_migrate,
    cmd_pause,
    cmd_purge,
    cmd_resume,
    cmd_retry,
    cmd_runs_bulk,
    cmd_runs_fork,
    cmd_runs_list,
    cmd_runs_pause,
    cmd_runs_resume,
    cmd_runs_show,
    cmd_signal,
)
from durable.cli.dashboard import cmd_dashboard
from durable.cli.history import cmd_history_drop, cmd_history_list
from durable.cli.output import (
    DEFAULT_LOG_FORMAT,
    FieldFormatter,
    Out,
    configure_logging,
    emit_json,
    human_duration,
    timeline_lines,
)
from durable.cli.parser import (
    DSN_ENV,
    EXIT_INTERNAL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    build_parser,
    parse_duration,
)
from durable.cli.schedules import (
    cmd_schedules_list,
    cmd_schedules_pause,
    cmd_schedules_resume,
    cmd_schedules_trigger,
)
from durable.cli.targets import is_engine_factory
from durable.db import is_connection_error, redact
from durable.errors import DatabaseUnavailable, DurableError

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "FieldFormatter",
    "human_duration",
    "is_engine_factory",
    "main",
    "run_async",
    "timeline_lines",
]

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop when it is installed (the `fast` extra), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _secrets(dsn: str | None) -> list[str]:
    """The password(s) in a DSN, to scrub from any text we print."""
    if not dsn:
        return []
    found: list[str] = []
    with contextlib.suppress(ValueError):
        password = urlsplit(dsn).password
        if password:
            found += [password, unquote(password)]
    found += [m for m in re.findall(r"password=([^&\s]+)", dsn, re.IGNORECASE) if m]
    return [s for s in found if s]


def _scrub(text: str, dsn: str | None) -> str:
    for secret in _secrets(dsn):
        text = text.replace(secret, "***")
    return text


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, DatabaseUnavailable) or is_connection_error(exc)


async def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    from durable.demo import run_demo

    return await run_demo(args.dsn, out=out, schema=args.schema)


_NEEDS_DSN: dict[str, Callable[[argparse.Namespace, str, Out], Coroutine[Any, Any, int]]] = {
    "migrate": cmd_migrate,
    "runs list": cmd_runs_list,
    "runs show": cmd_runs_show,
    "runs pause": cmd_runs_pause,
    "runs resume": cmd_runs_resume,
    "runs fork": cmd_runs_fork,
    "runs bulk": cmd_runs_bulk,
    "signal": cmd_signal,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "purge": cmd_purge,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "doctor": cmd_doctor,
    "history list": cmd_history_list,
    "history drop": cmd_history_drop,
    "schedules list": cmd_schedules_list,
    "schedules pause": cmd_schedules_pause,
    "schedules resume": cmd_schedules_resume,
}


async def dispatch(args: argparse.Namespace, out: Out) -> int:
    """Run the parsed command; raises `UsageError` and database errors for `main` to map."""
    command = args.command
    if command == "runs":
        command = f"runs {args.runs_command}"
    elif command == "schedules":
        command = f"schedules {args.schedules_command}"
    elif command == "history":
        command = f"history {args.history_command}"
    if command == "worker":
        return await cmd_worker(args, out)
    if command == "start":
        return await cmd_start(args, out)
    if command == "check":
        return await cmd_check(args, out)
    if command == "runs upgrade":
        return await cmd_runs_upgrade(args, out)
    if command == "schedules trigger":
        return await cmd_schedules_trigger(args, out)
    if command == "demo":
        return await cmd_demo(args, out)
    if command == "dashboard":
        return await cmd_dashboard(args, out)
    handler = _NEEDS_DSN[command]
    if command in ("purge", "history drop"):
        parse_duration(args.older_than)  # a bad duration is reported before any connection
    dsn = args.dsn
    if getattr(args, "read_dsn", None):  # runs list, runs show
        dsn = args.dsn_for_errors = args.read_dsn
    if not dsn:
        raise UsageError(f"no database given: pass --dsn postgresql://... or set {DSN_ENV}")
    return await handler(args, dsn, out)


def _error_json(code: int, exc: BaseException, message: str) -> dict[str, Any]:
    kind = "UsageError" if isinstance(exc, UsageError) else type(exc).__name__
    return {"error": {"exit_code": code, "type": kind, "message": message}}


def main(argv: Sequence[str] | None = None, out: Out | None = None) -> int:
    """Entry point of the `durable` console script; returns the exit code."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dsn_source = "--dsn"
    if args.dsn is None and os.environ.get(DSN_ENV):
        args.dsn, args.dsn_source = os.environ[DSN_ENV], f"${DSN_ENV}"
    configure_logging(args.log_level, args.command)
    args.dsn_for_errors = args.dsn

    def fail(code: int, exc: BaseException, message: str) -> int:
        message = _scrub(message, args.dsn_for_errors)
        print(f"durable: error: {message}", file=sys.stderr)
        if args.json:
            emit_json(out, _error_json(code, exc, message))
        return code

    try:
        return run_async(dispatch(args, out))
    except KeyboardInterrupt:
        return 130
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError) as exc:
        return fail(
            EXIT_USAGE,
            exc,
            f"schema {args.schema!r} has no durable tables ({exc}): run `durable migrate` first",
        )
    except (UsageError, DurableError) as exc:
        if not isinstance(exc, DatabaseUnavailable):
            # RunNotFound, SerializationError, ConfigurationError (bad DSN, credentials,
            # database), DefinitionError, WorkflowNotFound...: retrying cannot help.
            return fail(EXIT_USAGE, exc, str(exc))
        return _database_failure(exc, args, fail)
    except Exception as exc:
        if _is_database_error(exc):
            return _database_failure(exc, args, fail)
        text = "".join(traceback.format_exception(exc))
        print(_scrub(text, args.dsn_for_errors), file=sys.stderr, end="")
        return fail(EXIT_INTERNAL, exc, f"unexpected {type(exc).__name__}: {exc}")


def _database_failure(
    exc: Exception, args: argparse.Namespace, fail: Callable[[int, BaseException, str], int]
) -> int:
    dsn = args.dsn_for_errors
    where = redact(dsn) if dsn else "the database"
    detail = str(exc) if isinstance(exc, DatabaseUnavailable) else f"{exc!r}"
    if isinstance(exc, DatabaseUnavailable) and dsn and redact(dsn) in detail:
        return fail(EXIT_UNAVAILABLE, exc, f"database unavailable: {detail}")
    return fail(EXIT_UNAVAILABLE, exc, f"cannot reach the database at {where}: {detail}")
