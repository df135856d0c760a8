"""Test database fixtures: durable's own pytest plugin (`durable.testing`) gives each test a
fresh database cloned from a migrated template, on one server per session. This adds the
global invariant, checked after every test with a database, and the names the suite uses
(`server_dsn`, `db`, `pool`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.invariant import violations

pytest_plugins = ["durable.testing"]


@dataclass(frozen=True)
class Database:
    """A fresh, migrated database for one test."""

    name: str
    dsn: str
    schema: str = "durable"


@pytest.fixture(scope="session")
def server_dsn(durable_server_dsn: str) -> str:
    return durable_server_dsn


@pytest.fixture
def durable_dsn(durable_dsn: str) -> Iterator[str]:
    """The plugin's database, checked against the global invariant (tests/invariant.py)
    after the test, before it is dropped."""
    yield durable_dsn
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        broken = thread.submit(lambda: asyncio.run(violations(durable_dsn))).result()
    assert not broken, "invariant broken:\n" + "\n".join(broken)


@pytest.fixture
def db(durable_dsn: str) -> Database:
    """The test's database, by name and DSN."""
    return Database(name=urlsplit(durable_dsn).path.lstrip("/"), dsn=durable_dsn)


@pytest.fixture
async def pool(db: Database) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(db.dsn, min_size=1, max_size=20)
    assert p is not None
    yield p
    await p.close()


def pytest_report_header() -> str:
    return "durable test database: " + (
        "DURABLE_TEST_DSN" if os.environ.get("DURABLE_TEST_DSN") else "throwaway local server"
    )
