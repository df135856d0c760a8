"""The commands that run the application's engine (`MODULE:ENGINE`): worker, start, check
and runs upgrade."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any

import anyio

from durable.cli.output import Out, check_lines, emit_json, run_to_json, upgrade_lines
from durable.cli.parser import APP_ENV, EXIT_NOT_DONE, EXIT_OK, UsageError
from durable.cli.targets import open_app_engine, resolve_engine, warn_if_dsn_ignored
from durable.db import redact
from durable.engine import Engine
from durable.errors import RunCancelled, RunFailed, WorkflowNotFound

log = logging.getLogger("durable.cli")


async def cmd_worker(args: argparse.Namespace, out: Out) -> int:
    engine = await resolve_engine(args.target)
    if not engine.workflows:
        raise UsageError(f"{args.target} has no registered workflows: nothing to work on")
    warn_if_dsn_ignored(args, engine, args.target)
    args.dsn_for_errors = engine.dsn
    try:
        await open_app_engine(engine, migrate=not args.no_migrate)
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
                ",".join(
                    f"{name}(v{',v'.join(map(str, versions))})"
                    for name, versions in engine.versions.items()
                ),
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
    warn_if_dsn_ignored(args, engine, args.app)
    args.dsn_for_errors = engine.dsn
    try:
        await open_app_engine(engine, migrate=False)
        try:
            run_id = await engine.start(
                args.workflow,
                value,
                idempotency_key=args.idempotency_key,
                version=args.workflow_version,
            )
        except WorkflowNotFound as exc:  # a version the engine does not register
            raise UsageError(str(exc)) from None
        if not args.wait:
            if args.json:
                emit_json(out, {"run_id": run_id})
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
            emit_json(out, run_to_json(run))
        else:
            print(f"run {run_id} {run.status.value}: {run.error}", file=out)
        return EXIT_NOT_DONE
    except TimeoutError:
        status = (await engine.get_run(run_id, primary=True)).status.value
        if args.json:
            emit_json(out, {"run_id": run_id, "status": status, "timed_out": True})
        else:
            print(
                f"run {run_id} is still {status} after {args.timeout:g} s "
                "(is a worker running for this workflow?)",
                file=out,
            )
        return EXIT_NOT_DONE
    if args.json:
        emit_json(out, {"run_id": run_id, "status": "completed", "results": results})
    else:
        print(f"run {run_id} completed", file=out)
        print(json.dumps(results, indent=2, default=str), file=out)
    return EXIT_OK


async def cmd_check(args: argparse.Namespace, out: Out) -> int:
    engine = await resolve_engine(args.target)
    warn_if_dsn_ignored(args, engine, args.target)
    args.dsn_for_errors = engine.dsn
    try:
        await open_app_engine(engine, migrate=False)
        report = await engine.check()
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
    if args.json:
        emit_json(out, report.as_dict())
    else:
        print("\n".join(check_lines(report)), file=out)
    return EXIT_OK if report.ok else EXIT_NOT_DONE


async def cmd_runs_upgrade(args: argparse.Namespace, out: Out) -> int:
    if not args.app:
        raise UsageError(
            "durable runs upgrade needs the engine whose code the runs move to: "
            f"pass --app MODULE:ENGINE or set {APP_ENV}"
        )
    engine = await resolve_engine(args.app)
    warn_if_dsn_ignored(args, engine, args.app)
    args.dsn_for_errors = engine.dsn
    try:
        await open_app_engine(engine, migrate=False)
        try:
            report = await engine.upgrade(
                args.workflow,
                from_version=args.from_version,
                to_version=args.to_version,
                dry_run=args.dry_run,
            )
        except WorkflowNotFound as exc:
            raise UsageError(f"{args.app}: {exc}") from None
    finally:
        with anyio.CancelScope(shield=True):
            await engine.close()
    if args.json:
        emit_json(out, report.as_dict())
    else:
        print("\n".join(upgrade_lines(report)), file=out)
    return EXIT_NOT_DONE if report.refused else EXIT_OK
