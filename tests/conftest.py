"""Test database fixtures: one server per session, one migrated template, a clone per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from durable.migrate import migrate
from durable.server import provision
from tests.invariant import violations

TEMPLATE = "durable_test_template"


def with_database(dsn: str, database: str) -> str:
    """Return `dsn` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True)
class Database:
    """A fresh, migrated database for one test."""

    name: str
    dsn: str
    schema: str = "durable"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    with provision("DURABLE_TEST_DSN") as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def template_dsn(server_dsn: str) -> str:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    dsn = with_database(server_dsn, TEMPLATE)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, "durable")
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def db(server_dsn: str, template_dsn: str) -> AsyncIterator[Database]:
    """A database cloned from the migrated template, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    finally:
        await admin.close()
    database = Database(name=name, dsn=with_database(server_dsn, name))
    yield database
    # The global invariant (tests/invariant.py), after every test with a database.
    broken = await violations(database.dsn)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    assert not broken, "invariant broken:\n" + "\n".join(broken)


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
