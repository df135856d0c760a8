"""The commands that work on a database given by DSN: migrate, runs (list, show, pause,
resume, fork, bulk), signal, cancel, retry, purge, doctor, and pause and resume of a
workflow."""

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
from durable.doctor import Thresholds, diagnose
from durable.engine import Engine
from durable.model import RunStatus
from durable.operations import RunFilter


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
        runs = await engine.list_runs(
            status=args.status,
            workflow=args.workflow,
            limit=args.limit,
            version=args.workflow_version,
        )
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
            str(r.version),
            r.status.value,
            failed_at.get(r.id) or r.current_node or "-",
            r.parent_id or "-",
            local_time(r.created_at),
            local_time(r.updated_at),
            one_line(r.error, 60) or "-",
        )
        for r in runs
    ]
    headers = ("ID", "WORKFLOW", "VER", "STATUS", "NODE", "PARENT", "CREATED", "UPDATED", "ERROR")
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
            recorded = await engine.signal(
                args.run_id, args.name, payload, dedupe_key=args.dedupe_key
            )
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


async def cmd_runs_pause(args: argparse.Namespace, dsn: str, out: Out) -> int:
    return await _pause_or_resume(args, dsn, out, pause=True)


async def cmd_runs_resume(args: argparse.Namespace, dsn: str, out: Out) -> int:
    return await _pause_or_resume(args, dsn, out, pause=False)


async def _pause_or_resume(args: argparse.Namespace, dsn: str, out: Out, *, pause: bool) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        act = engine.pause_run if pause else engine.resume_run
        done = await act(args.run_id)
        run = await engine.get_run(args.run_id)
    finally:
        await engine.close()
    verb = "paused" if pause else "resumed"
    if args.json:
        emit_json(
            out,
            {"run_id": args.run_id, verb: done, "status": run.status.value, "paused": run.paused},
        )
    elif done:
        print(f"run {args.run_id} {verb} (status {run.status.value})", file=out)
    elif pause:
        why = "it is paused already" if run.paused else f"it is {run.status.value}"
        print(f"run {args.run_id} was not paused: {why}", file=out)
    else:
        print(f"run {args.run_id} was not resumed: it is not paused", file=out)
    return EXIT_OK if done else EXIT_NOT_DONE


async def cmd_runs_fork(args: argparse.Namespace, dsn: str, out: Out) -> int:
    new_input = None
    if args.input is not None:
        try:
            new_input = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input is not valid JSON ({exc})") from None
        if not isinstance(new_input, dict):
            raise UsageError("--input must be a JSON object")
    engine = await _open_engine(dsn, args.schema)
    try:
        fork_id = await engine.fork(args.run_id, from_node=args.from_node, input=new_input)
    finally:
        await engine.close()
    if args.json:
        emit_json(out, {"run_id": fork_id, "forked_from": args.run_id})
    else:
        print(fork_id, file=out)
    return EXIT_OK


async def cmd_runs_bulk(args: argparse.Namespace, dsn: str, out: Out) -> int:
    where = RunFilter(
        status=args.status,
        workflow=args.workflow,
        created_after=args.created_after,
        created_before=args.created_before,
        search=args.search,
    )
    if where.empty:
        raise UsageError("runs bulk needs at least one filter: --status, --workflow, ...")
    engine = await _open_engine(dsn, args.schema)
    try:
        if args.dry_run:
            statuses = ("failed",) if args.action == "retry" else ("pending", "running", "waiting")
            ids = await engine.matching_runs(where, statuses)
        elif args.action == "cancel":
            ids = await engine.cancel_runs(where, reason=args.reason)
        else:
            ids = await engine.retry_runs(where)
    finally:
        await engine.close()
    verb = {"cancel": "cancelled", "retry": "retried"}[args.action]
    if args.json:
        emit_json(out, {"action": args.action, "dry_run": args.dry_run, "runs": ids})
    elif args.dry_run:
        print(f"{len(ids)} run(s) would be {verb}", file=out)
    else:
        print(f"{len(ids)} run(s) {verb}", file=out)
    return EXIT_OK


async def cmd_doctor(args: argparse.Namespace, dsn: str, out: Out) -> int:
    limits = Thresholds(job_age=args.max_job_age, transaction_age=args.max_transaction_age)
    engine = await _open_engine(dsn, args.schema)
    try:
        async with engine.pool.acquire() as conn:
            report = await diagnose(conn, engine.queries, limits)
    finally:
        await engine.close()
    if args.json:
        emit_json(out, report.to_json())
    else:
        marks = {"ok": "ok     ", "warn": "WARN   ", "problem": "PROBLEM"}
        for f in report.findings:
            print(f"{marks[f.status]}  {f.check}: {f.summary}", file=out)
            if f.status != "ok":
                for detail in f.details[:20]:
                    text = ", ".join(f"{k}={v}" for k, v in detail.items())
                    print(f"           {text}", file=out)
        print("healthy" if report.healthy else "something needs a look (see above)", file=out)
    return EXIT_OK if report.healthy else EXIT_NOT_DONE
