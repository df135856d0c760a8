"""The `durable history` commands: list the month partitions of the history tables, and
drop the old ones whole (`Engine.history_partitions`, `Engine.drop_history`)."""

from __future__ import annotations

import argparse

from durable.cli.output import Out, emit_json, human_duration, local_time, table
from durable.cli.parser import EXIT_NOT_DONE, EXIT_OK, parse_duration
from durable.engine import Engine
from durable.history import KEPT_BECAUSE


async def _open_engine(dsn: str, schema: str) -> Engine:
    engine = Engine(dsn, schema=schema)
    await engine.open(migrate=False)
    return engine


async def cmd_history_list(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        parts = await engine.history_partitions()
    finally:
        await engine.close()
    if args.json:
        emit_json(
            out,
            [
                {
                    "name": p.name,
                    "start": p.start.isoformat() if p.start else None,
                    "end": p.end.isoformat(),
                    "runs": p.runs,
                    "first_id": p.first_id,
                    "end_id": p.end_id,
                }
                for p in parts
            ],
        )
        return EXIT_OK
    rows = [(p.name, local_time(p.start), local_time(p.end), f"~{p.runs:,}") for p in parts]
    print(table(("PARTITION", "FROM", "TO", "RUNS"), rows), file=out)
    return EXIT_OK


async def cmd_history_drop(args: argparse.Namespace, dsn: str, out: Out) -> int:
    older_than = parse_duration(args.older_than)
    engine = await _open_engine(dsn, args.schema)
    try:
        report = await engine.drop_history(
            older_than=older_than, dry_run=args.dry_run, lock_timeout=args.lock_timeout
        )
    finally:
        await engine.close()
    if args.json:
        emit_json(
            out,
            {
                "dry_run": args.dry_run,
                "dropped": report.dropped,
                "kept": report.kept,
                "seconds": report.seconds,
                "keys_deleted": report.keys_deleted,
            },
        )
    else:
        verb = "would drop" if args.dry_run else "dropped"
        for name in report.dropped:
            took = "" if args.dry_run else f" in {human_duration(report.seconds[name])}"
            print(f"{verb} {name}{took}", file=out)
        for name, reason in report.kept.items():
            print(f"kept {name}: {KEPT_BECAUSE.get(reason, reason)}", file=out)
        if not report.dropped:
            print(f"no month of history is older than {args.older_than} and finished", file=out)
    # 1: something asked for could not be dropped now because its tables were busy.
    return EXIT_NOT_DONE if "busy" in report.kept.values() else EXIT_OK
