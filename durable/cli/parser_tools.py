"""The `durable` command's tool subcommands: doctor, dashboard, schedules and demo."""

from __future__ import annotations

import argparse
import os

from durable.cli.values import APP_ENV, READ_DSN_ENV, Parser, positive_float, positive_int


def add_tools(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """doctor, dashboard, schedules and demo."""
    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="check for stranded runs, old jobs, long transactions, bloat, dead workers",
        description=(
            "Check what slows down or strands runs: stranded runs, the oldest due job, "
            "transactions holding the xmin horizon, bloat of the hot tables, listener "
            "health, workers with stale heartbeats, the claim's query plan, the history "
            "partitions of this month and the next. Exit 0 when all is well, 1 when "
            "something needs a look."
        ),
    )
    doctor.add_argument(
        "--max-job-age",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="a due job older than this is a problem (default 60)",
    )
    doctor.add_argument(
        "--max-transaction-age",
        type=positive_float,
        default=300.0,
        metavar="SECONDS",
        help="a transaction open longer than this is a problem (default 300)",
    )

    dash = sub.add_parser(
        "dashboard",
        parents=[common],
        help="serve the web dashboard, the admin API and /metrics",
        description=(
            "Serve the admin app under uvicorn, for the database of --dsn (or $DURABLE_DSN) "
            "or of the engine MODULE:ENGINE defines. The admin token comes from "
            "$DURABLE_ADMIN_TOKEN, the read-only token from $DURABLE_READ_TOKEN; "
            "--insecure-no-auth drops them, on a loopback address only."
        ),
    )
    dash.add_argument("target", metavar="MODULE:ENGINE", nargs="?", default=None)
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dash.add_argument("--port", type=positive_int, default=8484, help="port (default 8484)")
    dash.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no token (only with a loopback --host)",
    )
    dash.add_argument(
        "--read-dsn",
        default=os.environ.get(READ_DSN_ENV) or None,
        metavar="DSN",
        help=(
            f"with --dsn: a read replica for the pages and listings (default: ${READ_DSN_ENV}); "
            "actions go to --dsn"
        ),
    )

    schedules = sub.add_parser(
        "schedules",
        parents=[common],
        help="list, trigger, pause and resume cron schedules",
        description=(
            "Schedules are declared in code (Engine(schedules=[...])) and kept in the "
            "database. `list`, `pause` and `resume` work on the database (--dsn); `trigger` "
            "starts a run now and needs the engine that declares the schedule (--app "
            f"MODULE:ENGINE or ${APP_ENV})."
        ),
    )
    schedules_sub = schedules.add_subparsers(
        dest="schedules_command", metavar="ACTION", parser_class=Parser, required=True
    )
    schedules_sub.add_parser("list", parents=[common], help="every schedule, by name")
    trigger = schedules_sub.add_parser(
        "trigger", parents=[common], help="start a run now (the schedule's overlap applies)"
    )
    trigger.add_argument("name", metavar="NAME")
    trigger.add_argument(
        "--app",
        metavar="MODULE:ENGINE",
        default=os.environ.get(APP_ENV) or None,
        help=f"the engine that declares the schedule (default: ${APP_ENV})",
    )
    for schedule_verb, text in (
        ("pause", "stop a schedule's ticks (runs it started go on)"),
        ("resume", "let a paused schedule tick again, from its next tick"),
    ):
        schedules_sub.add_parser(schedule_verb, parents=[common], help=text).add_argument(
            "name", metavar="NAME"
        )

    sub.add_parser("demo", parents=[common], help="run the order-saga demo")
