"""Multi-host DSNs (`postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write`): a host
that refuses connections is skipped; `connect_timeout` bounds one connect over all hosts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import durable


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a host gone silent)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _multi_host(dsn: str, first_port: int) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return (
        f"postgresql://{user}127.0.0.1:{first_port},{parts.hostname}:{parts.port}{parts.path}"
        "?target_session_attrs=read-write"
    )


wf = durable.Workflow("multi_host")


@wf.step
async def only(ctx: durable.Context) -> int:
    return 1


async def test_a_host_that_refuses_connections_is_skipped(db: Any) -> None:
    dsn = _multi_host(db.dsn, _free_port())
    async with durable.Engine(dsn, workflows=[wf]) as engine, engine.worker(concurrency=2):
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=20) == {"only": 1}


async def test_connect_timeout_bounds_a_connect_over_all_hosts(db: Any, silent_port: int) -> None:
    # asyncpg spends the one timeout on the hosts in order: a first host that accepts and
    # never answers uses it up, and the second is not tried (docs/guides/scaling.md).
    dsn = _multi_host(db.dsn, silent_port)
    engine = durable.Engine(dsn, workflows=[wf], connect_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(durable.DatabaseUnavailable, match="no answer within 1 s"):
        await engine.open()
    assert time.monotonic() - began < 5
