"""The commands that work on a database given by DSN: migrate, runs, signal, cancel,
retry, purge, pause and resume."""

from __future__ import annotations

import argparse
import json
from typing import Any

from durable.cli.output import (
    Out,
    emit_json,
    failed_node,
    local_time,
    one_line,
    run_details,
    run_to_json,
    table,
)
from durable.cli.parser import EXIT_NOT_DONE, EXIT_OK, UsageError, parse_duration
from durable.engine import Engine
from durable.model import RunStatus


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
        emit_json(out, {"schema": args.schema, "applied": applied})
    elif applied:
        versions = ", ".join(f"{v:04d}" for v in applied)
        print(f"schema {args.schema!r}: applied migration(s) {versions}", file=out)
    else:
        print(f"schema {args.schema!r} is up to date", file=out)
    return EXIT_OK


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
        emit_json(
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
            local_time(r.created_at),
            local_time(r.updated_at),
            one_line(r.error, 60) or "-",
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
        emit_json(out, run_to_json(run, journal=True))
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
        emit_json(out, {"run_id": args.run_id, "signal": args.name, "recorded": recorded})
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
        emit_json(out, {"run_id": args.run_id, "cancelled": cancelled, "status": status})
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
        emit_json(out, {"run_id": args.run_id, "retried": retried, "status": status})
    elif retried:
        print(f"run {args.run_id} will be re-run from its failed node (status {status})", file=out)
    else:
        print(f"run {args.run_id} was not retried: it is {status}, not failed", file=out)
    return EXIT_OK if retried else EXIT_NOT_DONE


async def cmd_pause(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        paused = await engine.pause(args.workflow)
    finally:
        await engine.close()
    if args.json:
        emit_json(out, {"workflow": args.workflow, "paused": paused})
    elif paused:
        print(f"workflow {args.workflow!r} paused: workers stop claiming its jobs", file=out)
    else:
        print(f"workflow {args.workflow!r} is already paused", file=out)
    return EXIT_OK if paused else EXIT_NOT_DONE


async def cmd_resume(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        resumed = await engine.resume(args.workflow)
    finally:
        await engine.close()
    if args.json:
        emit_json(out, {"workflow": args.workflow, "resumed": resumed})
    elif resumed:
        print(f"workflow {args.workflow!r} resumed: workers claim its jobs again", file=out)
    else:
        print(f"workflow {args.workflow!r} was not paused", file=out)
    return EXIT_OK if resumed else EXIT_NOT_DONE


async def cmd_purge(args: argparse.Namespace, dsn: str, out: Out) -> int:
    older_than = parse_duration(args.older_than)
    engine = await _open_engine(dsn, args.schema)
    try:
        purged = await engine.purge(older_than=older_than)
    finally:
        await engine.close()
    if args.json:
        emit_json(out, {"purged": purged, "older_than_seconds": older_than.total_seconds()})
    else:
        print(f"purged {purged} finished run(s) older than {args.older_than}", file=out)
    return EXIT_OK
