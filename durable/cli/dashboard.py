"""`durable dashboard`: the admin app (JSON API, dashboard, /metrics) under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

import anyio

from durable.cli.output import Out
from durable.cli.parser import DSN_ENV, EXIT_OK, UsageError
from durable.cli.targets import open_app_engine, resolve_engine, warn_if_dsn_ignored
from durable.engine import Engine

log = logging.getLogger("durable.cli")

TOKEN_ENV = "DURABLE_ADMIN_TOKEN"
READ_TOKEN_ENV = "DURABLE_READ_TOKEN"


async def cmd_dashboard(args: argparse.Namespace, out: Out) -> int:
    try:
        import uvicorn

        from durable.web import admin_app
        from durable.web.auth import is_loopback
    except ImportError as exc:
        raise UsageError(
            f"the dashboard needs the web extra ({exc.name} is missing): "
            "pip install 'durable-pg[web]'"
        ) from None
    token = os.environ.get(TOKEN_ENV) or None
    read_token = os.environ.get(READ_TOKEN_ENV) or None
    if args.insecure_no_auth:
        if not is_loopback(args.host):
            raise UsageError(
                f"--insecure-no-auth serves only on loopback, not on {args.host}: "
                f"set {TOKEN_ENV} to serve on another address"
            )
        token = read_token = None
    elif token is None:
        raise UsageError(
            f"set {TOKEN_ENV} (and optionally {READ_TOKEN_ENV}) to the token(s) the dashboard "
            "asks for, or pass --insecure-no-auth on a loopback address"
        )
    engine: Engine | None = None
    if args.target:
        engine = await resolve_engine(args.target)
        warn_if_dsn_ignored(args, engine, args.target)
        args.dsn_for_errors = engine.dsn
        await open_app_engine(engine, migrate=False)
        source: Engine | str = engine
    elif args.dsn and args.read_dsn:
        engine = Engine(args.dsn, read_dsn=args.read_dsn, schema=args.schema)
        await engine.open(migrate=False)
        source = engine
    elif args.dsn:
        source = args.dsn
    else:
        raise UsageError(f"no database given: pass --dsn, MODULE:ENGINE, or set {DSN_ENV}")
    try:
        app = admin_app(
            source,
            token=token,
            read_only_token=read_token,
            insecure_no_auth=args.insecure_no_auth,
            schema=args.schema,
        )
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="info", lifespan="on"
        )
        log.info("durable dashboard on http://%s:%d/", args.host, args.port)
        await uvicorn.Server(config).serve()
    finally:
        if engine is not None:
            with anyio.CancelScope(shield=True):
                await engine.close()
    return EXIT_OK
