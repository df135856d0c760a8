"""The `durable` command: migrate a database, run a worker, inspect and steer runs, demo.

    durable [--dsn DSN] [--schema NAME] [--json] [--log-level L] COMMAND ...
    durable --version

    migrate                         apply pending migrations (idempotent)
    worker MODULE:ENGINE            run a worker for the engine defined in MODULE
    start WORKFLOW [JSON] --app MODULE:ENGINE [--idempotency-key K] [--wait]
                                    start a run (and wait for its result)
    runs list [--status S] ...      list runs, newest first
    runs show ID                    a run and its journal as a timeline
    signal ID NAME [JSON]           send a signal (payload: a JSON value) to a run
    cancel ID                       cancel a run (its completed steps are compensated)
    retry ID                        re-run a failed run from its failed node
    purge --older-than 30d          delete finished runs older than a duration
    demo                            run the order-saga demo (starts its own PostgreSQL)

`--dsn` defaults to `$DURABLE_DSN`. `worker` and `start` use the DSN of the engine MODULE
defines; a different `--dsn` is ignored with a warning that names both (passwords hidden).
MODULE:ENGINE names a `durable.Engine`, or a function without parameters annotated
`-> durable.Engine` (anything else is refused without being called).

Exit codes: 0 done; 1 the answer is "not done" (a cancel or signal that found the run
already finished, a retry of a run that had not failed, a `start --wait` whose run failed,
was cancelled or did not finish in time); 2 a usage or configuration error, which retrying
will not fix (unknown run id, bad JSON, bad duration, bad MODULE:ENGINE, no DSN, a malformed
DSN or unsupported scheme, a wrong password or user, a missing database, an unmigrated
schema); 3 the database cannot be reached or does not answer (retrying later may work);
4 an unexpected internal error. With `--json` an error is also written to stdout as
`{"error": {"exit_code": N, "type": ..., "message": ...}}`. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import traceback
import typing
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn, TextIO, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import asyncpg

from durable import __version__
from durable.db import is_connection_error, redact
from durable.engine import Engine
from durable.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DurableError,
    RunCancelled,
    RunFailed,
)
from durable.model import Run, RunStatus
from durable.sql import migrations

log = logging.getLogger("durable.cli")

EXIT_OK = 0
EXIT_NOT_DONE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 4

DSN_ENV = "DURABLE_DSN"
APP_ENV = "DURABLE_APP"

# The structured fields durable's log records carry, in the order the formatter prints them.
LOG_FIELDS = ("run_id", "workflow", "node", "attempt", "worker")


class UsageError(Exception):
    """A mistake of the user's (bad argument, unknown run...): one line, exit 2."""


# -- formatting -------------------------------------------------------------------------------


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop when it is installed (the `fast` extra), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _ts(value: datetime | None) -> str:
    """A timestamp in local time with its UTC offset, e.g. `2026-05-01 14:03:07+02:00`."""
    if value is None:
        return "-"
    return value.astimezone().isoformat(sep=" ", timespec="seconds")


def human_duration(seconds: float) -> str:
    """`840 ms` under 10 s, `12.4 s` under 10 min, then `14.2 min`."""
    if seconds < 10:
        ms = seconds * 1000
        return "<1 ms" if ms < 1 else f"{ms:.0f} ms"
    if seconds < 600:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _ms(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    if seconds < 0:
        return "-"  # clocks disagree (the end was stamped at its transaction's start)
    return human_duration(seconds)


def _one_line(text: str | None, width: int = 120) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render rows as a plain-text table with aligned columns."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def timeline_lines(run: Run, indent: str = "  ") -> list[str]:
    """A run's journal and failed attempts in time order, one line per event.

    Each line: the offset from the run's creation (ms, then s past 10 s, then min past
    10 min), the journal key (`node`,
    `node@compensate`, ...), the outcome (`completed`, `failed`, or `retried` for an attempt
    that failed and was tried again), the attempt number, how long it took, and the error.
    Needs a `Run` read with `get_run(id, journal=True)`.
    """
    # The final failed attempt of a node is both an attempt row and its failed journal row.
    final = {(e.key, e.attempts) for e in run.journal if e.status == "failed"}
    events: list[tuple[datetime, int, tuple[str, str, str, str, str]]] = []
    for seq, entry in enumerate(run.journal):
        when = entry.started_at or entry.finished_at
        events.append(
            (
                when,
                2 * seq + 1,
                (
                    entry.key,
                    entry.status,
                    f"attempt {entry.attempts}",
                    _ms(entry.started_at, entry.finished_at),
                    _one_line(entry.error),
                ),
            )
        )
    for seq, attempt in enumerate(run.attempts):
        if (attempt.key, attempt.attempt) in final:
            continue
        when = attempt.started_at or attempt.failed_at
        events.append(
            (
                when,
                2 * seq,
                (
                    attempt.key,
                    "retried",
                    f"attempt {attempt.attempt}",
                    _ms(attempt.started_at, attempt.failed_at),
                    _one_line(attempt.error),
                ),
            )
        )
    if not events:
        return [f"{indent}(no journal entries yet)"]
    events.sort(key=lambda e: (e[0], e[1]))
    rows: list[tuple[str, str, str, str, str, str]] = []
    for when, _, cells in events:
        since = max((when - run.created_at).total_seconds(), 0.0)
        rows.append(
            (f"+{since * 1000:.0f} ms" if since < 10 else f"+{human_duration(since)}", *cells)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines: list[str] = []
    for offset, key, outcome, tried, took, error in rows:
        text = (
            f"{indent}{offset.rjust(widths[0])}  {key.ljust(widths[1])}  "
            f"{outcome.ljust(widths[2])}  {tried.ljust(widths[3])}  {took.rjust(widths[4])}"
        )
        lines.append(f"{text}  {error}" if error else text)
    return lines


def run_to_json(run: Run, *, journal: bool = False) -> dict[str, Any]:
    """A run as a JSON-ready dict (with its journal and attempts when `journal`).

    `results` is every completed node's result; once the run has completed it is also the
    run's result, so `Run.result` is not repeated.
    """
    data: dict[str, Any] = {
        "id": run.id,
        "workflow": run.workflow,
        "status": run.status.value,
        "current_node": run.current_node,
        "parent_id": run.parent_id,
        "input": run.input,
        "results": run.results,
        "error": run.error,
        "created_at": _iso(run.created_at),
        "updated_at": _iso(run.updated_at),
        "finished_at": _iso(run.finished_at),
        "children": list(run.children),
    }
    if journal:
        data["journal"] = [
            {
                "key": e.key,
                "node": e.node,
                "status": e.status,
                "result": e.result,
                "error": e.error,
                "attempts": e.attempts,
                "started_at": _iso(e.started_at),
                "finished_at": _iso(e.finished_at),
            }
            for e in run.journal
        ]
        data["attempts"] = [
            {
                "key": a.key,
                "attempt": a.attempt,
                "error": a.error,
                "started_at": _iso(a.started_at),
                "failed_at": _iso(a.failed_at),
            }
            for a in run.attempts
        ]
    return data


def run_details(run: Run) -> list[str]:
    """A run's fields and its timeline, as `durable runs show` prints them."""
    fields = [
        ("run", run.id),
        ("workflow", run.workflow),
        ("status", run.status.value),
        ("node", run.current_node or "-"),
        ("parent", run.parent_id or "-"),
        ("created", _ts(run.created_at)),
        ("updated", _ts(run.updated_at)),
        ("finished", _ts(run.finished_at)),
        ("input", _one_line(json.dumps(run.input), 200)),
    ]
    if run.children:
        fields.append(("children", ", ".join(run.children)))
    if run.error:
        fields.append(("error", _one_line(run.error, 200)))
    if run.status is RunStatus.COMPLETED:
        fields.append(("result", _one_line(json.dumps(run.result), 200)))
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]
    lines += ["", "timeline (offset from creation, key, outcome, attempt, duration, error):"]
    lines += timeline_lines(run)
    return lines


# -- arguments --------------------------------------------------------------------------------


_DURATION = re.compile(r"(\d+)([wdhms])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_duration(text: str) -> timedelta:
    """Parse `30d`, `12h`, `90m`, `45s`, `2w` or combinations such as `1d12h`."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise UsageError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 45s"
        )
    total = timedelta()
    for amount, unit in _DURATION.findall(compact):
        total += timedelta(**{_UNITS[unit]: int(amount)})
    return total


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"durable: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `durable` command."""
    # Global options are accepted before or after the subcommand; SUPPRESS keeps a
    # subcommand's parser from overwriting a value given before it with its default.
    common = _Parser(add_help=False)
    common.add_argument("--dsn", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--schema", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    parser = _Parser(
        prog="durable",
        description="Crash-resumable asyncio workflows on PostgreSQL.",
        epilog=(
            "exit codes: 0 done, 1 not done (e.g. the run had already finished), "
            "2 usage or configuration error (bad DSN, wrong password, missing database), "
            "3 database unreachable, 4 internal error"
        ),
    )
    parser.add_argument(
        "--dsn", default=None, help=f"PostgreSQL connection string (default: ${DSN_ENV})"
    )
    parser.add_argument(
        "--version", action="version", version=f"durable {__version__} (distribution durable-pg)"
    )
    parser.add_argument("--schema", default="durable", help="schema of durable's tables")
    parser.add_argument("--json", action="store_true", default=False, help="machine output")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log to stderr at this level (default: info for `worker`, else warning)",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, required=True
    )

    sub.add_parser("migrate", parents=[common], help="apply pending migrations")

    worker = sub.add_parser(
        "worker",
        parents=[common],
        help="run a worker for an engine defined in your code",
        description=(
            "Import MODULE, take ENGINE from it (a durable.Engine, or a function without "
            "parameters annotated `-> durable.Engine`), apply pending migrations and work "
            "until SIGTERM or SIGINT, then stop gracefully. A second signal stops at once. "
            "The engine's own DSN is used."
        ),
    )
    worker.add_argument("target", metavar="MODULE:ENGINE", help="e.g. myapp.jobs:engine")
    worker.add_argument("--concurrency", type=_positive_int, default=16)
    worker.add_argument("--poll-interval", type=_positive_float, default=None)
    worker.add_argument(
        "--grace-period",
        type=_positive_float,
        default=10.0,
        help="seconds in-flight jobs get to finish on shutdown",
    )
    worker.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply pending migrations on start (exit 2 if the schema is not migrated)",
    )

    start = sub.add_parser(
        "start",
        parents=[common],
        help="start a run of a workflow your code registers",
        description=(
            "Start a run of WORKFLOW with the JSON object INPUT (default {}) and print its id. "
            "The workflow definition comes from the engine --app MODULE:ENGINE (or "
            f"${APP_ENV}) registers, and so does the DSN. With --wait, wait for a worker "
            "to finish the run and print its result (exit 1 if it failed, was cancelled "
            "or did not finish within --timeout)."
        ),
    )
    start.add_argument("workflow", metavar="WORKFLOW")
    start.add_argument("input", metavar="JSON", nargs="?", default=None, help="a JSON object")
    start.add_argument(
        "--app",
        metavar="MODULE:ENGINE",
        default=os.environ.get(APP_ENV) or None,
        help=f"the engine that registers WORKFLOW (default: ${APP_ENV})",
    )
    start.add_argument("--idempotency-key", metavar="KEY", default=None)
    start.add_argument("--wait", action="store_true", help="wait for the run to finish")
    start.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="seconds --wait waits (default 60)",
    )

    runs = sub.add_parser("runs", parents=[common], help="list and inspect runs")
    runs_sub = runs.add_subparsers(
        dest="runs_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    runs_list = runs_sub.add_parser("list", parents=[common], help="runs, newest first")
    runs_list.add_argument("--status", choices=[s.value for s in RunStatus])
    runs_list.add_argument("--workflow")
    runs_list.add_argument("--limit", type=_positive_int, default=50)

    runs_show = runs_sub.add_parser("show", parents=[common], help="a run and its timeline")
    runs_show.add_argument("run_id", metavar="ID")

    sig = sub.add_parser("signal", parents=[common], help="send a signal to a run")
    sig.add_argument("run_id", metavar="ID")
    sig.add_argument("name", metavar="NAME")
    sig.add_argument("payload", metavar="JSON", nargs="?", default=None, help="a JSON value")

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a run")
    cancel.add_argument("run_id", metavar="ID")
    cancel.add_argument("--reason", default="cancelled", help="kept as the run's error")

    retry = sub.add_parser("retry", parents=[common], help="re-run a failed run")
    retry.add_argument("run_id", metavar="ID")

    purge = sub.add_parser("purge", parents=[common], help="delete old finished runs")
    purge.add_argument(
        "--older-than",
        required=True,
        metavar="DURATION",
        help="e.g. 30d, 12h, 90m, 45s (finished longer ago than this)",
    )

    sub.add_parser("demo", parents=[common], help="run the order-saga demo")
    return parser


# -- errors -----------------------------------------------------------------------------------


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


# -- commands ---------------------------------------------------------------------------------


Out = TextIO


def _emit_json(out: Out, value: Any) -> None:
    out.write(json.dumps(value, indent=2, default=str) + "\n")


async def _open_engine(dsn: str, schema: str) -> Engine:
    engine = Engine(dsn, schema=schema)
    await engine.open(migrate=False)
    return engine


async def cmd_migrate(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        applied = await engine.migrate()
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, {"schema": args.schema, "applied": applied})
    elif applied:
        versions = ", ".join(f"{v:04d}" for v in applied)
        print(f"schema {args.schema!r}: applied migration(s) {versions}", file=out)
    else:
        print(f"schema {args.schema!r} is up to date", file=out)
    return EXIT_OK


def failed_node(run: Run) -> str | None:
    """The node whose failure ended `run` (read with `journal=True`), if any."""
    for entry in run.journal:
        if entry.status == "failed" and "@" not in entry.key:
            return entry.node
    return None


async def cmd_runs_list(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        runs = await engine.list_runs(status=args.status, workflow=args.workflow, limit=args.limit)
        # A finished run has no current node; for a failed one the journal says which failed.
        failed_at = {
            r.id: failed_node(await engine.get_run(r.id, journal=True))
            for r in runs
            if r.status is RunStatus.FAILED
        }
    finally:
        await engine.close()
    if args.json:
        _emit_json(
            out,
            [
                {
                    **run_to_json(r),
                    **({"failed_node": failed_at[r.id]} if r.id in failed_at else {}),
                }
                for r in runs
            ],
        )
        return EXIT_OK
    if not runs:
        print("no runs", file=out)
        return EXIT_OK
    # NODE is where the run is, or for a failed run the node that failed. PARENT links a
    # child run to the run that started it. ERROR is cut to keep one line per run.
    rows = [
        (
            r.id,
            r.workflow,
            r.status.value,
            failed_at.get(r.id) or r.current_node or "-",
            r.parent_id or "-",
            _ts(r.created_at),
            _ts(r.updated_at),
            _one_line(r.error, 60) or "-",
        )
        for r in runs
    ]
    headers = ("ID", "WORKFLOW", "STATUS", "NODE", "PARENT", "CREATED", "UPDATED", "ERROR")
    print(table(headers, rows), file=out)
    return EXIT_OK


async def cmd_runs_show(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        run = await engine.get_run(args.run_id, journal=True)
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, run_to_json(run, journal=True))
    else:
        print("\n".join(run_details(run)), file=out)
    return EXIT_OK


async def cmd_signal(args: argparse.Namespace, dsn: str, out: Out) -> int:
    payload: Any = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f'the signal payload is not valid JSON ({exc}); quote it, e.g. \'{{"by": "ann"}}\''
            ) from None
    engine = await _open_engine(dsn, args.schema)
    try:
        try:
            recorded = await engine.signal(args.run_id, args.name, payload)
        except ValueError as exc:  # e.g. an empty signal name
            raise UsageError(str(exc)) from None
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, {"run_id": args.run_id, "signal": args.name, "recorded": recorded})
    elif recorded:
        print(f"signal {args.name!r} recorded for run {args.run_id}", file=out)
    else:
        print(
            f"run {args.run_id} has already finished: signal {args.name!r} not recorded", file=out
        )
    return EXIT_OK if recorded else EXIT_NOT_DONE


async def cmd_cancel(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        cancelled = await engine.cancel(args.run_id, reason=args.reason)
        status = (await engine.get_run(args.run_id)).status.value
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, {"run_id": args.run_id, "cancelled": cancelled, "status": status})
    elif cancelled and status == RunStatus.CANCELLED.value:
        print(f"run {args.run_id} cancelled (it had no completed step to compensate)", file=out)
    elif cancelled:
        print(
            f"run {args.run_id} is being cancelled (status {status}): a worker compensates "
            "its completed steps, then ends it 'cancelled'",
            file=out,
        )
    else:
        print(f"run {args.run_id} was not cancelled: it is already {status}", file=out)
    return EXIT_OK if cancelled else EXIT_NOT_DONE


async def cmd_retry(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        retried = await engine.retry(args.run_id)
        status = (await engine.get_run(args.run_id)).status.value
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, {"run_id": args.run_id, "retried": retried, "status": status})
    elif retried:
        print(f"run {args.run_id} will be re-run from its failed node (status {status})", file=out)
    else:
        print(f"run {args.run_id} was not retried: it is {status}, not failed", file=out)
    return EXIT_OK if retried else EXIT_NOT_DONE


async def cmd_purge(args: argparse.Namespace, dsn: str, out: Out) -> int:
    older_than = parse_duration(args.older_than)
    engine = await _open_engine(dsn, args.schema)
    try:
        purged = await engine.purge(older_than=older_than)
    finally:
        await engine.close()
    if args.json:
        _emit_json(out, {"purged": purged, "older_than_seconds": older_than.total_seconds()})
    else:
        print(f"purged {purged} finished run(s) older than {args.older_than}", file=out)
    return EXIT_OK


def load_engine_target(target: str) -> Any:
    """Import `MODULE:ATTR` (ATTR may be dotted) and return the attribute.

    Import errors raised by the user's module are reported in one line; their traceback is
    logged at DEBUG (`--log-level debug`).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ENGINE (e.g. myapp.jobs:engine), got {target!r}")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        dotted = module_name.removesuffix(".py").replace(os.sep, ".").replace("/", ".")
        raise UsageError(
            f"{module_name!r} is a file path, but MODULE:ENGINE takes a module name: try "
            f"{dotted.strip('.')}:{attr} from the directory that holds the package, or put "
            "that directory on PYTHONPATH"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    debug_hint = (
        "" if log.isEnabledFor(logging.DEBUG) else " (--log-level debug shows the traceback)"
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import module {module_name!r} (is it on PYTHONPATH?)"
            ) from None
        log.debug("importing %r failed", module_name, exc_info=True)
        raise UsageError(f"importing {module_name!r} failed: {exc}{debug_hint}") from exc
    except Exception as exc:
        log.debug("importing %r failed", module_name, exc_info=True)
        raise UsageError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{debug_hint}"
        ) from exc
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    return value


def is_engine_factory(value: Any) -> bool:
    """True for a function (sync or async) that takes no arguments and is annotated to
    return a `durable.Engine`: the only callables `durable worker` and `durable start` call.

    Any other function (say the application's `main()`) could start runs or serve traffic,
    so it is refused without being called.
    """
    if not (inspect.isfunction(value) or inspect.ismethod(value)):
        return False
    signature = inspect.signature(value)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(
        p.default is inspect.Parameter.empty and p.kind not in variadic
        for p in signature.parameters.values()
    ):
        return False
    try:
        returns = typing.get_type_hints(value).get("return")
    except Exception:  # an annotation that does not resolve: judge it by its text
        returns = signature.return_annotation
    if isinstance(returns, str):
        return returns in ("Engine", "durable.Engine", "durable.engine.Engine")
    return isinstance(returns, type) and issubclass(returns, Engine)


async def resolve_engine(target: str) -> Engine:
    """The `durable.Engine` that `MODULE:ENGINE` names, calling it if it is a factory."""
    value = load_engine_target(target)
    if is_engine_factory(value):
        try:
            value = value()
            if inspect.isawaitable(value):
                value = await value
        except DurableError:
            raise
        except Exception as exc:
            raise UsageError(f"calling {target} failed: {type(exc).__name__}: {exc}") from exc
    elif callable(value) and not isinstance(value, Engine):
        raise UsageError(
            f"{target} is a {type(value).__name__} but not an engine factory, so it was not "
            "called: name a durable.Engine, or a function without parameters annotated "
            "`-> durable.Engine`"
        )
    if not isinstance(value, Engine):
        raise UsageError(
            f"{target} is a {type(value).__name__}, not a durable.Engine "
            "(or a function without parameters annotated `-> durable.Engine`)"
        )
    return value


def _warn_if_dsn_ignored(args: argparse.Namespace, engine: Engine, target: str) -> None:
    """The engine in the user's code keeps its own database; say so if one was given too."""
    if args.dsn and args.dsn != engine.dsn:
        uses = f"its DSN {redact(engine.dsn)}" if engine.dsn else "its own asyncpg pool"
        log.warning("%s %s is ignored: %s uses %s", args.dsn_source, redact(args.dsn), target, uses)


async def _open_app_engine(engine: Engine, *, migrate: bool) -> None:
    """Open an engine from the user's code; without `migrate`, insist on a current schema."""
    await engine.open(migrate=migrate)
    if migrate:
        return
    async with engine.pool.acquire() as conn:
        # Raises UndefinedTableError on a schema never migrated: main() says what to do.
        applied = {r[0] for r in await conn.fetch(engine.queries["applied_migrations"])}
    missing = [m.version for m in migrations() if m.version not in applied]
    if missing:
        versions = ", ".join(f"{v:04d}" for v in missing)
        raise ConfigurationError(
            f"schema {engine.schema!r} lacks migration(s) {versions}: run `durable migrate` first"
        )


async def cmd_worker(args: argparse.Namespace, out: Out) -> int:
    engine = await resolve_engine(args.target)
    if not engine.workflows:
        raise UsageError(f"{args.target} has no registered workflows: nothing to work on")
    _warn_if_dsn_ignored(args, engine, args.target)
    args.dsn_for_errors = engine.dsn
    try:
        await _open_app_engine(engine, migrate=not args.no_migrate)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await engine.close()
        raise
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            worker = await tg.start(
                lambda task_status: engine.run_worker(
                    concurrency=args.concurrency,
                    poll_interval=args.poll_interval,
                    grace_period=args.grace_period,
                    task_status=task_status,
                )
            )
            signals_seen = 0

            def on_signal(signum: int) -> None:
                nonlocal signals_seen
                signals_seen += 1
                name = signal.Signals(signum).name
                if signals_seen == 1:
                    log.info(
                        "%s received: stopping gracefully (in-flight jobs get %.0f s; "
                        "send it again to stop at once)",
                        name,
                        args.grace_period,
                    )
                    worker.stop()
                else:
                    log.warning("%s received again: stopping at once", name)
                    tg.cancel_scope.cancel()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, int(sig))
                installed.append(int(sig))
            log.info(
                "durable worker ready: workflows=%s concurrency=%d database=%s schema=%s",
                ",".join(sorted(engine.workflows)),
                args.concurrency,
                redact(engine.dsn) if engine.dsn else "pool",
                engine.schema,
            )
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        with anyio.CancelScope(shield=True):
            await engine.close()
    log.info("durable worker stopped")
    return EXIT_OK


async def cmd_start(args: argparse.Namespace, out: Out) -> int:
    if not args.app:
        raise UsageError(
            "durable start needs the engine that registers the workflow: "
            f"pass --app MODULE:ENGINE or set {APP_ENV}"
        )
    value: Any = {}
    if args.input is not None:
        try:
            value = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f'the input is not valid JSON ({exc}); quote it, e.g. \'{{"sku": "A1"}}\''
            ) from None
        if not isinstance(value, dict):
            raise UsageError(f"the input must be a JSON object, got {type(value).__name__}")
    engine = await resolve_engine(args.app)
    if args.workflow not in engine.workflows:
        known = ", ".join(sorted(engine.workflows)) or "none"
        raise UsageError(
            f"{args.app} registers no workflow {args.workflow!r} (it registers: {known})"
        )
    _warn_if_dsn_ignored(args, engine, args.app)
    args.dsn_for_errors = engine.dsn
    try:
        await _open_app_engine(engine, migrate=False)
        run_id = await engine.start(args.workflow, value, idempotency_key=args.idempotency_key)
        if not args.wait:
            if args.json:
                _emit_json(out, {"run_id": run_id})
            else:
                print(run_id, file=out)
            return EXIT_OK
        return await _wait_and_report(engine, run_id, args, out)
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()


async def _wait_and_report(engine: Engine, run_id: str, args: argparse.Namespace, out: Out) -> int:
    try:
        results = await engine.wait(run_id, timeout=args.timeout)
    except (RunFailed, RunCancelled) as exc:
        run = exc.run
        if args.json:
            _emit_json(out, run_to_json(run))
        else:
            print(f"run {run_id} {run.status.value}: {run.error}", file=out)
        return EXIT_NOT_DONE
    except TimeoutError:
        status = (await engine.get_run(run_id)).status.value
        if args.json:
            _emit_json(out, {"run_id": run_id, "status": status, "timed_out": True})
        else:
            print(
                f"run {run_id} is still {status} after {args.timeout:g} s "
                "(is a worker running for this workflow?)",
                file=out,
            )
        return EXIT_NOT_DONE
    if args.json:
        _emit_json(out, {"run_id": run_id, "status": "completed", "results": results})
    else:
        print(f"run {run_id} completed", file=out)
        print(json.dumps(results, indent=2, default=str), file=out)
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, out: Out) -> int:
    from durable.demo import run_demo

    return await run_demo(args.dsn, out=out, schema=args.schema)


_NEEDS_DSN: dict[str, Callable[[argparse.Namespace, str, Out], Coroutine[Any, Any, int]]] = {
    "migrate": cmd_migrate,
    "runs list": cmd_runs_list,
    "runs show": cmd_runs_show,
    "signal": cmd_signal,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "purge": cmd_purge,
}


async def dispatch(args: argparse.Namespace, out: Out) -> int:
    """Run the parsed command; raises `UsageError` and database errors for `main` to map."""
    command = args.command
    if command == "runs":
        command = f"runs {args.runs_command}"
    if command == "worker":
        return await cmd_worker(args, out)
    if command == "start":
        return await cmd_start(args, out)
    if command == "demo":
        return await cmd_demo(args, out)
    handler = _NEEDS_DSN[command]
    if command == "purge":
        parse_duration(args.older_than)  # a bad duration is reported before any connection
    if not args.dsn:
        raise UsageError(f"no database given: pass --dsn postgresql://... or set {DSN_ENV}")
    return await handler(args, args.dsn, out)


class FieldFormatter(logging.Formatter):
    """A log format that keeps durable's structured fields visible in plain text.

    durable's records carry `run_id`, `workflow`, `node`, `attempt` and `worker` as
    attributes (`extra=`); a plain format string drops them, so two retries of different
    runs would read the same. This formatter appends the ones a record has, e.g.
    `... charge attempt 2 failed, retrying in 4.00 s: ... [run_id=01J... workflow=order]`,
    skipping any value the message already shows. The `durable` command logs with it; use
    it in your own logging configuration (`"()": "durable.cli.FieldFormatter"`).
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted line with the record's durable fields appended."""
        text = super().formatMessage(record)
        message = record.getMessage()
        fields = [
            f"{name}={value}"
            for name in LOG_FIELDS
            if (value := getattr(record, name, None)) is not None
            and not (name in ("run_id", "workflow") and str(value) in message)
        ]
        return f"{text} [{' '.join(fields)}]" if fields else text


DEFAULT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(level: str | None, command: str | None) -> None:
    if level is None:
        if command == "worker":
            level = "info"
        elif command == "demo":
            return  # the demo prints its own progress; it keeps library logs quiet
        else:
            level = "warning"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FieldFormatter(DEFAULT_LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


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
    _configure_logging(args.log_level, args.command)
    args.dsn_for_errors = args.dsn

    def fail(code: int, exc: BaseException, message: str) -> int:
        message = _scrub(message, args.dsn_for_errors)
        print(f"durable: error: {message}", file=sys.stderr)
        if args.json:
            _emit_json(out, _error_json(code, exc, message))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
