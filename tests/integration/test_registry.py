"""The workers registry: a running worker keeps its row fresh and deletes it on stop."""

from __future__ import annotations

import os
import socket
from typing import Any

import durable
from tests.integration.helpers import eventually, fetch, open_engine


def noop() -> durable.Workflow:
    wf = durable.Workflow("noop")

    @wf.step
    async def only(ctx: durable.Context) -> int:
        return 1

    return wf


async def test_a_worker_registers_beats_and_unregisters(db: Any) -> None:
    async with open_engine(db, noop()) as engine:
        async with engine.worker(concurrency=3) as worker:

            async def registered() -> list[Any]:
                return await fetch(engine, "SELECT * FROM durable.workers")

            rows = await eventually(registered)
            assert len(rows) == 1
            row = rows[0]
            assert row["name"] == worker.name
            assert (row["host"], row["pid"]) == (socket.gethostname(), os.getpid())
            assert (row["workflows"], row["concurrency"]) == (["noop"], 3)
            first = row["heartbeat_at"]
            await engine.wait(await engine.start("noop"), timeout=10)
        assert await fetch(engine, "SELECT * FROM durable.workers") == []
        assert first is not None
