"""Testing workflows: the pytest plugin (`pytest_plugins = ["durable.testing"]` in your
`conftest.py`) and the `Harness` with its virtual clock (`durable.harness`).

The fixtures are synchronous (their database work runs on a loop of its own), so they
work with pytest-asyncio and anyio's plugin alike, whatever the loop scope:

- `durable_dsn`: the DSN of a fresh, migrated database for the test: a copy of a template
  database made once per session (`CREATE DATABASE ... TEMPLATE` takes milliseconds),
  dropped after the test.
- `durable_server_dsn` (session): the server of those databases: the one named by
  `DURABLE_TEST_DSN` (its role needs `CREATEDB`), else a throwaway server started for the
  session (`durable.server.LocalPostgres`) and removed at its end.
- `durable_template_sql` (session): SQL run once on the template after durable's
  migrations (None by default); override it to give every test database your
  application's tables.

PYTEST_DONT_REWRITE: the plugin has no assertions for pytest to rewrite, and a test module
may import `durable.testing.Harness` before pytest loads the plugin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from durable.harness import CLOCK_SETTING, Harness, VirtualClock
from durable.migrate import migrate
from durable.server import provision

T = TypeVar("T")


def database_dsn(dsn: str, database: str) -> str:
    """`dsn` pointed at another database of the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def _blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on a loop of its own, in a thread of its own: the
    fixtures work whatever loop the test's plugin runs, and in any scope."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


async def _admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def _make_template(server_dsn: str, name: str, sql: str | None) -> None:
    await _admin(server_dsn, f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(database_dsn(server_dsn, name))
    try:
        await migrate(conn, "durable")
        if sql:
            await conn.execute(sql)
    finally:
        await conn.close()


def _drop(server_dsn: str, name: str) -> None:
    _blocking(lambda: _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def durable_server_dsn() -> Iterator[str]:
    """The server of the test databases: `DURABLE_TEST_DSN`, else a throwaway one."""
    with provision("DURABLE_TEST_DSN") as dsn:
        yield dsn


@pytest.fixture(scope="session")
def durable_template_sql() -> str | None:
    """SQL run once on the template database after durable's migrations (None: none).
    Override it to give every test database your application's tables."""
    return None


@pytest.fixture(scope="session")
def durable_template(durable_server_dsn: str, durable_template_sql: str | None) -> Iterator[str]:
    """The name of the session's migrated template database."""
    name = f"durable_template_{uuid.uuid4().hex[:12]}"
    _blocking(lambda: _make_template(durable_server_dsn, name, durable_template_sql))
    yield name
    _drop(durable_server_dsn, name)


@pytest.fixture
def durable_dsn(durable_server_dsn: str, durable_template: str) -> Iterator[str]:
    """The DSN of a fresh, migrated database for this test (dropped after it)."""
    name = f"durable_test_{uuid.uuid4().hex[:12]}"
    _blocking(
        lambda: _admin(
            durable_server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{durable_template}"'
        )
    )
    yield database_dsn(durable_server_dsn, name)
    _drop(durable_server_dsn, name)


__all__ = [
    "CLOCK_SETTING",
    "Harness",
    "VirtualClock",
    "database_dsn",
    "durable_dsn",
    "durable_server_dsn",
    "durable_template",
    "durable_template_sql",
]
