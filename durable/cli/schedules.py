"""The `durable schedules` commands: list, pause and resume on a database given by DSN;
trigger through the engine that declares the schedule (`--app MODULE:ENGINE`)."""

from __future__ import annotations

import argparse
from typing import Any

import anyio

from durable.cli.commands import answer
from durable.cli.output import Out, emit_json, local_time, table
from durable.cli.parser import APP_ENV, EXIT_NOT_DONE, EXIT_OK, UsageError
from durable.cli.targets import open_app_engine, resolve_engine, warn_if_dsn_ignored
from durable.engine import Engine
from durable.schedule import ScheduleInfo


def schedule_to_json(s: ScheduleInfo) -> dict[str, Any]:
    """A schedule as `--json` prints it (timestamps in ISO 8601)."""
    return {
        "name": s.name,
        "workflow": s.workflow,
        "cron": s.cron,
        "timezone": s.timezone,
        "input": s.input,
        "overlap": s.overlap,
        "catch_up": s.catch_up,
        "max_catch_up": s.max_catch_up,
        "paused": s.paused,
        "next_at": s.next_at.isoformat() if s.next_at else None,
        "last_tick": s.last_tick.isoformat() if s.last_tick else None,
        "last_run_id": s.last_run_id,
        "last_run_status": s.last_run_status.value if s.last_run_status else None,
    }


async def _open_engine(dsn: str, schema: str) -> Engine:
    engine = Engine(dsn, schema=schema)
    await engine.open(migrate=False)
    return engine


async def cmd_schedules_list(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        schedules = await engine.schedules()
    finally:
        await engine.close()
    if args.json:
        emit_json(out, [schedule_to_json(s) for s in schedules])
        return EXIT_OK
    if not schedules:
        print("no schedules (declare them with Engine(schedules=[...]))", file=out)
        return EXIT_OK
    # NEXT is in local time; TZ is the zone the cron expression is read in.
    rows = [
        (
            s.name,
            s.workflow,
            s.cron,
            s.timezone,
            "paused" if s.paused else "active",
            local_time(s.next_at),
            local_time(s.last_tick),
            s.last_run_id or "-",
            s.last_run_status.value if s.last_run_status else "-",
            s.overlap,
            s.catch_up,
        )
        for s in schedules
    ]
    headers = (
        "NAME",
        "WORKFLOW",
        "CRON",
        "TZ",
        "STATE",
        "NEXT",
        "LAST TICK",
        "LAST RUN",
        "RUN STATUS",
        "OVERLAP",
        "CATCH UP",
    )
    print(table(headers, rows), file=out)
    return EXIT_OK


async def cmd_schedules_pause(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        paused = await engine.pause_schedule(args.name)
    finally:
        await engine.close()
    return answer(
        out,
        args.json,
        {"schedule": args.name, "paused": paused},
        paused,
        f"schedule {args.name!r} paused",
        f"schedule {args.name!r} was already paused",
    )


async def cmd_schedules_resume(args: argparse.Namespace, dsn: str, out: Out) -> int:
    engine = await _open_engine(dsn, args.schema)
    try:
        resumed = await engine.resume_schedule(args.name)
        found = [s for s in await engine.schedules() if s.name == args.name]
    finally:
        await engine.close()
    next_at = found[0].next_at if found else None
    return answer(
        out,
        args.json,
        {
            "schedule": args.name,
            "resumed": resumed,
            "next_at": next_at.isoformat() if next_at else None,
        },
        resumed,
        f"schedule {args.name!r} resumed, next tick {local_time(next_at)}",
        f"schedule {args.name!r} was not paused",
    )


async def cmd_schedules_trigger(args: argparse.Namespace, out: Out) -> int:
    if not args.app:
        raise UsageError(
            "durable schedules trigger needs the engine that declares the schedule: "
            f"pass --app MODULE:ENGINE or set {APP_ENV}"
        )
    engine = await resolve_engine(args.app)
    warn_if_dsn_ignored(args, engine, args.app)
    args.dsn_for_errors = engine.dsn
    try:
        await open_app_engine(engine, migrate=False)
        run_id = await engine.trigger(args.name)
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
    if args.json:
        emit_json(out, {"schedule": args.name, "run_id": run_id, "skipped": run_id is None})
    elif run_id is not None:
        print(run_id, file=out)
    else:
        print(
            f"schedule {args.name!r} started no run: its previous run is still active and "
            "its overlap is 'skip'",
            file=out,
        )
    return EXIT_OK if run_id is not None else EXIT_NOT_DONE
