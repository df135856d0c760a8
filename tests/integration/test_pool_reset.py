"""The engine's pool skips asyncpg's reset query for durable's own borrows (a start is then
one round trip, not two) and still resets every connection user code or a failed
operation gives back."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from helpers import open_engine

import durable

# What asyncpg sends on release to reset a session (its default reset query).
RESET_QUERY = "RESET ALL"


def one_step() -> durable.Workflow:
    wf = durable.Workflow("pooled")

    @wf.step
    async def only(ctx: durable.Context) -> int:
        return 1

    return wf


async def last_query(db: Any, pid: int) -> str:
    """The last statement the backend `pid` ran (it is idle: the pool holds it)."""
    conn = await asyncpg.connect(db.dsn)
    try:
        row = await conn.fetchrow("SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await conn.close()
    assert row is not None
    assert row["state"] == "idle", row
    return str(row["query"])


async def the_one_connection(engine: durable.Engine) -> int:
    async with engine.pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    return pid


async def test_a_start_gives_its_connection_back_without_the_reset_round_trip(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf, pool_size=1) as engine:
        pid = await the_one_connection(engine)
        # That borrow was user code's: it was reset.
        assert RESET_QUERY in await last_query(db, pid)
        await engine.start(wf)
        query = await last_query(db, pid)
        assert "start_run" in query, query
        assert RESET_QUERY not in query


async def test_a_connection_user_code_borrowed_is_reset_before_durable_uses_it(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf, pool_size=1) as engine:
        async with engine.pool.acquire() as conn:
            default = await conn.fetchval("SHOW statement_timeout")
            await conn.execute("SET statement_timeout = '1234ms'")
            await conn.execute("LISTEN somebody_elses_channel")
        async with engine.pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == default
            listening = await conn.fetchval(
                "SELECT count(*) FROM pg_listening_channels() AS c "
                "WHERE c = 'somebody_elses_channel'"
            )
            assert listening == 0
        run_id = await engine.start(wf)
        assert (await engine.get_run(run_id)).status == "pending"


async def test_a_durable_borrow_that_failed_is_reset(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf, pool_size=1) as engine:
        pid = await the_one_connection(engine)
        await engine.start(wf)
        assert RESET_QUERY not in await last_query(db, pid)
        with pytest.raises(durable.DurableError):
            await engine.signal("01NOSUCHRUN0000000000000000", "go")
        assert RESET_QUERY in await last_query(db, pid)
