"""The `durable` command's argument parser: its subcommands and their options."""

from __future__ import annotations

import argparse
import os

from durable import __version__
from durable.cli.parser_tools import add_tools
from durable.cli.values import (
    APP_ENV,
    DSN_ENV,
    EXIT_INTERNAL,
    EXIT_NOT_DONE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    READ_DSN_ENV,
    Parser,
    UsageError,
    parse_duration,
    positive_float,
    positive_int,
    timestamp,
)
from durable.model import RunStatus

# Re-exported: the command modules take them from here.
__all__ = [
    "APP_ENV",
    "DSN_ENV",
    "EXIT_INTERNAL",
    "EXIT_NOT_DONE",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "READ_DSN_ENV",
    "UsageError",
    "build_parser",
    "parse_duration",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `durable` command."""
    # Global options are accepted before or after the subcommand; SUPPRESS keeps a
    # subcommand's parser from overwriting a value given before it with its default.
    common = Parser(add_help=False)
    common.add_argument("--dsn", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--schema", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    parser = Parser(
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
        dest="command", metavar="COMMAND", parser_class=Parser, required=True
    )

    _serving(sub, common)
    _runs(sub, common)
    _operations(sub, common)
    add_tools(sub, common)
    return parser


def _serving(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """migrate, worker and start."""
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
    worker.add_argument("--concurrency", type=positive_int, default=16)
    worker.add_argument("--poll-interval", type=positive_float, default=None)
    worker.add_argument(
        "--grace-period",
        type=positive_float,
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
    start.add_argument(
        "--workflow-version",
        metavar="N",
        type=positive_int,
        default=None,
        help="the version of WORKFLOW to start (default: the highest the engine registers)",
    )
    start.add_argument("--wait", action="store_true", help="wait for the run to finish")
    start.add_argument(
        "--timeout",
        type=positive_float,
        default=60.0,
        help="seconds --wait waits (default 60)",
    )


def _runs(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """runs (list, show, the run actions, fork, bulk, upgrade) and check."""
    # Listings may read a replica: they decide nothing, and a replica's lag only delays
    # what they show.
    reads = Parser(add_help=False)
    reads.add_argument(
        "--read-dsn",
        default=os.environ.get(READ_DSN_ENV) or None,
        metavar="DSN",
        help=f"read from this replica instead of --dsn (default: ${READ_DSN_ENV}); it may lag",
    )
    runs = sub.add_parser("runs", parents=[common], help="list and inspect runs")
    runs_sub = runs.add_subparsers(
        dest="runs_command", metavar="ACTION", parser_class=Parser, required=True
    )
    runs_list = runs_sub.add_parser("list", parents=[common, reads], help="runs, newest first")
    runs_list.add_argument("--status", choices=[s.value for s in RunStatus])
    runs_list.add_argument("--workflow")
    runs_list.add_argument("--limit", type=positive_int, default=50)

    runs_list.add_argument("--workflow-version", metavar="N", type=positive_int)

    runs_show = runs_sub.add_parser("show", parents=[common, reads], help="a run and its timeline")
    runs_show.add_argument("run_id", metavar="ID")

    for verb, text in (
        ("pause", "pause a run: no worker claims it until it is resumed"),
        ("resume", "resume a paused run"),
    ):
        action = runs_sub.add_parser(verb, parents=[common], help=text)
        action.add_argument("run_id", metavar="ID")

    fork = runs_sub.add_parser(
        "fork",
        parents=[common],
        help="start a copy of a run from one of its nodes",
        description=(
            "Start a new run of the same workflow that keeps the journal of ID before NODE "
            "(default: the node that failed) and runs from NODE on, with ID's input or the "
            "JSON object given with --input. Prints the new run's id."
        ),
    )
    fork.add_argument("run_id", metavar="ID")
    fork.add_argument("--from-node", metavar="NODE", default=None)
    fork.add_argument("--input", metavar="JSON", default=None, help="a JSON object")

    bulk = runs_sub.add_parser(
        "bulk",
        parents=[common],
        help="cancel or retry every run a filter matches",
        description=(
            "cancel: every pending, running or waiting run that matches; retry: every "
            "failed run that matches. At least one filter is needed. --dry-run counts them."
        ),
    )
    bulk.add_argument("action", choices=["cancel", "retry"])
    bulk.add_argument("--status", choices=[s.value for s in RunStatus])
    bulk.add_argument("--workflow")
    bulk.add_argument("--created-after", type=timestamp, metavar="ISO8601")
    bulk.add_argument("--created-before", type=timestamp, metavar="ISO8601")
    bulk.add_argument("--search", metavar="ID_OR_KEY", help="a run id or idempotency key")
    bulk.add_argument("--reason", default="cancelled", help="kept as the error (cancel)")
    bulk.add_argument("--dry-run", action="store_true", help="count the runs, change nothing")
    upgrade = runs_sub.add_parser(
        "upgrade",
        parents=[common],
        help="move unfinished runs to another version of their workflow",
        description=(
            "Move the unfinished runs of WORKFLOW at version --from to version --to (default: "
            "the highest) as the engine --app MODULE:ENGINE (or "
            f"${APP_ENV}) registers it, with its current shape; --from may equal --to, for "
            "runs of an older shape of that version. A run moves only when every node its "
            "journal names is declared by the target before its position with the same kind, "
            "and the node at its position has the same name and kind; the others are listed "
            "with the reason. Each run moves in its own transaction, safe while workers run. "
            "Exit 1 if any run was refused."
        ),
    )
    upgrade.add_argument("workflow", metavar="WORKFLOW")
    upgrade.add_argument(
        "--from", dest="from_version", metavar="N", type=positive_int, required=True
    )
    upgrade.add_argument("--to", dest="to_version", metavar="N", type=positive_int, default=None)
    upgrade.add_argument(
        "--app",
        metavar="MODULE:ENGINE",
        default=os.environ.get(APP_ENV) or None,
        help=f"the engine whose code the runs move to (default: ${APP_ENV})",
    )
    upgrade.add_argument(
        "--dry-run", action="store_true", help="say what would move and what not; change nothing"
    )

    check = sub.add_parser(
        "check",
        parents=[common],
        help="can this code continue every unfinished run? (a deploy gate)",
        description=(
            "Import MODULE and take ENGINE from it (as `worker` does), then look at every "
            "unfinished run in the engine's database: a run can be continued when its "
            "workflow, version and shape are registered by that engine. Lists the others, "
            "grouped by cause, and exits 1 if there are any, so that CI/CD can refuse a "
            "deploy that would strand runs. Writes nothing; the schema must be migrated."
        ),
    )
    check.add_argument("target", metavar="MODULE:ENGINE", help="e.g. myapp.jobs:engine")


def _operations(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """signal, cancel, retry, pause, resume, purge and history."""
    sig = sub.add_parser("signal", parents=[common], help="send a signal to a run")
    sig.add_argument("run_id", metavar="ID")
    sig.add_argument("name", metavar="NAME")
    sig.add_argument("payload", metavar="JSON", nargs="?", default=None, help="a JSON value")
    sig.add_argument(
        "--dedupe-key",
        metavar="KEY",
        default=None,
        help="record the signal once per run for this key, however often it is sent",
    )

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a run")
    cancel.add_argument("run_id", metavar="ID")
    cancel.add_argument("--reason", default="cancelled", help="kept as the run's error")

    retry = sub.add_parser("retry", parents=[common], help="re-run a failed run")
    retry.add_argument("run_id", metavar="ID")

    pause = sub.add_parser(
        "pause",
        parents=[common],
        help="stop workers claiming a workflow's jobs",
        description=(
            "Workers stop claiming the jobs of WORKFLOW (attempts in flight finish); its runs "
            "keep their state and new runs can still be started. Exit 1 if it was paused."
        ),
    )
    pause.add_argument("workflow", metavar="WORKFLOW")
    resume = sub.add_parser(
        "resume",
        parents=[common],
        help="let workers claim a paused workflow's jobs again",
        description="Workers claim the jobs of WORKFLOW again. Exit 1 if it was not paused.",
    )
    resume.add_argument("workflow", metavar="WORKFLOW")

    purge = sub.add_parser("purge", parents=[common], help="delete old finished runs")
    purge.add_argument(
        "--older-than",
        required=True,
        metavar="DURATION",
        help="e.g. 30d, 12h, 90m, 45s (finished longer ago than this)",
    )

    history = sub.add_parser(
        "history",
        parents=[common],
        help="the month partitions of the history tables; drop old months whole",
    )
    history_sub = history.add_subparsers(
        dest="history_command", metavar="ACTION", parser_class=Parser, required=True
    )
    history_sub.add_parser("list", parents=[common], help="every month partition, oldest first")
    drop = history_sub.add_parser(
        "drop",
        parents=[common],
        help="drop every month whose runs all finished longer ago than a duration",
        description=(
            "Drop whole months of runs with their journal, attempts and signals: those "
            "whose runs all finished longer ago than --older-than (purge deletes such runs "
            "row by row instead). Exit 1 if a month was left because its tables were busy."
        ),
    )
    drop.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 90d")
    drop.add_argument("--dry-run", action="store_true", help="say what would be dropped")
    drop.add_argument(
        "--lock-timeout",
        type=positive_float,
        default=0.5,
        metavar="SECONDS",
        help="the longest a drop waits for its locks, statements behind it waiting too "
        "(default 0.5)",
    )
