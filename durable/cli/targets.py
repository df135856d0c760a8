"""Loading the application's engine that `MODULE:ENGINE` names (`worker`, `start`)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import typing
from typing import Any

from durable.cli.parser import UsageError
from durable.db import redact
from durable.engine import Engine
from durable.errors import ConfigurationError, DurableError
from durable.sql import migrations

log = logging.getLogger("durable.cli")


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


def warn_if_dsn_ignored(args: argparse.Namespace, engine: Engine, target: str) -> None:
    """The engine in the user's code keeps its own database; say so if one was given too."""
    if args.dsn and args.dsn != engine.dsn:
        uses = f"its DSN {redact(engine.dsn)}" if engine.dsn else "its own asyncpg pool"
        log.warning("%s %s is ignored: %s uses %s", args.dsn_source, redact(args.dsn), target, uses)


async def open_app_engine(engine: Engine, *, migrate: bool) -> None:
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
