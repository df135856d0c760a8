"""Shared helpers for the engine integration tests: an engine with a background worker,
small SQL shortcuts and a deadline-bounded wait for a database condition."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio

import durable


class HasDsn(Protocol):
    dsn: str


@asynccontextmanager
async def open_engine(
    db: HasDsn,
    *workflows: durable.Workflow,
    setup: str | None = None,
    **engine_options: Any,
) -> AsyncIterator[durable.Engine]:
    """An open engine on `db` (no worker). `setup` is SQL run once it is open."""
    engine = durable.Engine(db.dsn, workflows=list(workflows), **engine_options)
    async with engine:
        if setup:
            await execute(engine, setup)
        yield engine


@asynccontextmanager
async def running_engine(
    db: HasDsn,
    *workflows: durable.Workflow,
    setup: str | None = None,
    concurrency: int = 4,
    poll_interval: float = 0.05,
    grace_period: float = 2.0,
    **engine_options: Any,
) -> AsyncIterator[durable.Engine]:
    """An open engine on `db` with a background worker running for the block."""
    async with (
        open_engine(db, *workflows, setup=setup, **engine_options) as engine,
        engine.worker(
            concurrency=concurrency, poll_interval=poll_interval, grace_period=grace_period
        ),
    ):
        yield engine


async def execute(engine: durable.Engine, sql: str, *args: Any) -> str:
    async with engine.pool.acquire() as conn:
        return await conn.execute(sql, *args)


async def fetchval(engine: durable.Engine, sql: str, *args: Any) -> Any:
    async with engine.pool.acquire() as conn:
        return await conn.fetchval(sql, *args)


async def fetch(engine: durable.Engine, sql: str, *args: Any) -> list[Any]:
    async with engine.pool.acquire() as conn:
        return list(await conn.fetch(sql, *args))


async def counts(engine: durable.Engine) -> tuple[int, int]:
    """(number of runs, number of jobs)."""
    async with engine.pool.acquire() as conn:
        runs = await conn.fetchval("SELECT count(*) FROM durable.runs")
        jobs = await conn.fetchval("SELECT count(*) FROM durable.jobs")
    return runs, jobs


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(interval)


async def run_status(engine: durable.Engine, run_id: str) -> str:
    return (await engine.get_run(run_id)).status.value


async def until_attempts(
    engine: durable.Engine, run_id: str, key: str, n: int, *, timeout: float = 10.0
) -> durable.Run:
    """Wait until the run has recorded `n` failed attempts of journal key `key`."""

    async def check() -> durable.Run | None:
        run = await engine.get_run(run_id, journal=True)
        return run if sum(1 for a in run.attempts if a.key == key) >= n else None

    result: durable.Run = await eventually(check, timeout=timeout)
    return result


async def until_blocked(
    engine: durable.Engine, statement: str, *, timeout: float = 10.0
) -> list[int]:
    """Wait until a backend running a statement that contains `statement` (e.g.
    'cancel_tree_v1') waits for a lock, as `pg_stat_activity` shows it; return the pids
    holding it up. Proves "X is blocked" instead of assuming it after a sleep."""

    async def check() -> list[int]:
        rows = await fetch(
            engine,
            "SELECT pg_blocking_pids(pid) AS by FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND strpos(query, $1) > 0",
            statement,
        )
        return [pid for row in rows for pid in row["by"]]

    blockers: list[int] = await eventually(check, timeout=timeout)
    return blockers


def refusing_journal(key: str) -> str:
    """SQL (an engine's `setup`) for a trigger that makes the database refuse the completed
    journal row of `key`, with the error text `journal refuses <key>`."""
    return f"""
        CREATE FUNCTION refuse_{key}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.key = '{key}' AND NEW.status = 'completed' THEN
                RAISE EXCEPTION 'journal refuses {key}';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_{key} BEFORE INSERT ON durable.journal
            FOR EACH ROW EXECUTE FUNCTION refuse_{key}();
    """


def counting(name: str, calls: Counter[str]) -> Any:
    """A handler that counts its calls in `calls[name]` and returns `name`."""

    async def handler(ctx: durable.Context) -> str:
        calls[name] += 1
        return name

    handler.__name__ = name
    return handler
