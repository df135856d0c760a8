"""Named limits on steps (SPEC, Flow control): at most `concurrency` attempts in flight and
at most `rate` attempt starts in any window of `per` seconds, per `limit_key`; a step that
cannot get a slot or a token waits without using an attempt or a worker slot. Measured from
the handlers' own records, written through `ctx.conn`. (Several processes and SIGKILL:
tests/acceptance/test_flow_crash.py.)"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, fetch, fetchval, open_engine, running_engine

import durable

CALLS = """
CREATE TABLE calls (
    run_id text NOT NULL, key text NOT NULL, attempt integer NOT NULL,
    started_at timestamptz NOT NULL, ended_at timestamptz
);
"""
#: A handler records its start a moment after its attempt took the token (the next
#: statement of the same transaction); windows are checked this much short of `per`.
SLACK = timedelta(milliseconds=100)


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    top = now = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def most_in_a_window(starts: list[datetime], per: timedelta) -> int:
    """The most starts inside any window of length `per` (closed at both ends)."""
    starts = sorted(starts)
    top = 0
    for i, t in enumerate(starts):
        top = max(top, sum(1 for u in starts[i:] if u - t <= per))
    return top


def limited(name: str, limit: str, *, hold: float = 0.0, keyed: bool = False) -> durable.Workflow:
    wf = durable.Workflow(name)

    async def call(ctx: durable.Context) -> int:
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO calls VALUES ($1, $2, $3, clock_timestamp(), NULL)",
            ctx.run_id,
            ctx.input.get("k", ""),
            ctx.attempt,
        )
        await asyncio.sleep(hold)
        await ctx.conn.execute(
            "UPDATE calls SET ended_at = clock_timestamp() WHERE run_id = $1", ctx.run_id
        )
        return ctx.attempt

    wf.step(
        "call",
        call,
        limit=limit,
        limit_key=(lambda ctx: ctx.input["k"]) if keyed else None,
        max_attempts=1,
    )
    return wf


async def _calls(engine: durable.Engine) -> list[Any]:
    return await fetch(engine, "SELECT * FROM calls ORDER BY started_at")


async def test_at_most_concurrency_attempts_are_in_flight(db: Any) -> None:
    wf = limited("api", "api", hold=0.1)
    limits = {"api": durable.Limit(concurrency=2)}
    async with running_engine(db, wf, setup=CALLS, concurrency=8, limits=limits) as engine:
        ids = [await engine.start(wf, {}) for _ in range(8)]
        for run_id in ids:
            assert await engine.wait(run_id, timeout=30) == {"call": 1}
        rows = await _calls(engine)
        usage = await engine.limit_usage()
        attempts = await fetchval(engine, "SELECT count(*) FROM durable.attempts")
    assert len(rows) == 8
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in rows]) == 2
    assert {r["attempt"] for r in rows} == {1}
    assert attempts == 0  # waiting for a slot is not an attempt
    assert [(u.name, u.key, u.in_flight, u.slots) for u in usage] == [("api", "", 0, 2)]


async def test_at_most_rate_starts_in_any_window_and_the_waits_use_no_attempt(
    db: Any,
) -> None:
    wf = limited("rated", "rated")
    limits = {"rated": durable.Limit(rate=4, per=1.0)}
    async with running_engine(db, wf, setup=CALLS, concurrency=8, limits=limits) as engine:
        ids = [await engine.start(wf, {}) for _ in range(12)]
        for run_id in ids:
            assert await engine.wait(run_id, timeout=30) == {"call": 1}
        rows = await _calls(engine)
        attempts = await fetchval(engine, "SELECT count(*) FROM durable.attempts")
        tokens = await fetchval(engine, "SELECT count(*) FROM durable.limit_tokens")
    starts = [r["started_at"] for r in rows]
    assert most_in_a_window(starts, timedelta(seconds=1) - SLACK) <= 4
    # 12 starts at 4 per second: the last is two windows after the first.
    assert starts[-1] - starts[0] >= timedelta(seconds=2) - SLACK
    assert {r["attempt"] for r in rows} == {1}
    assert attempts == 0
    assert tokens == 4


async def test_a_limit_key_gives_each_key_its_own_slots_and_tokens(db: Any) -> None:
    wf = limited("per_key", "per_key", hold=0.2, keyed=True)
    limits = {"per_key": durable.Limit(rate=2, per=1.0, concurrency=1)}
    async with running_engine(db, wf, setup=CALLS, concurrency=8, limits=limits) as engine:
        ids = [await engine.start(wf, {"k": k}) for _ in range(4) for k in ("a", "b")]
        for run_id in ids:
            await engine.wait(run_id, timeout=30)
        rows = await _calls(engine)
        usage = await engine.limit_usage()
    by_key: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by_key[r["key"]].append(r)
    for key, calls in by_key.items():
        assert len(calls) == 4, key
        assert most_in_a_window([c["started_at"] for c in calls], timedelta(seconds=1) - SLACK) <= 2
        assert max_overlap([(c["started_at"], c["ended_at"]) for c in calls]) == 1
    # Keys do not share a slot: with one slot for all, no two calls would overlap.
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in rows]) == 2
    # Nor a bucket: with one bucket of 2 tokens, no window of a second would hold more than
    # 2 starts. (At least 3, not all 4: a key's second start waits for its first to end and
    # its run to be woken, which a loaded machine can stretch.)
    assert most_in_a_window([r["started_at"] for r in rows], timedelta(seconds=1) - SLACK) >= 3
    assert sorted((u.key, u.in_flight, u.tokens) for u in usage) == [("a", 0, 2), ("b", 0, 2)]


async def test_a_run_waiting_for_a_slot_is_woken_when_the_holder_lets_go(db: Any) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = durable.Workflow("gated")

    @wf.step(limit="one")
    async def hold(ctx: durable.Context) -> str:
        if ctx.input["first"]:
            entered.set()
            await gate.wait()
        assert ctx.conn is not None
        return str(await ctx.conn.fetchval("SELECT clock_timestamp()"))

    limits = {"one": durable.Limit(concurrency=1)}
    async with running_engine(db, wf, concurrency=4, limits=limits) as engine:
        first = await engine.start(wf, {"first": True})
        await asyncio.wait_for(entered.wait(), 10)
        second = await engine.start(wf, {"first": False})

        async def parked() -> Any:
            rows = await fetch(
                engine, "SELECT wake_at, limit_wait FROM durable.runs WHERE id = $1", second
            )
            return rows[0] if rows[0]["limit_wait"] is not None else None

        waiting = await eventually(parked)
        assert waiting["limit_wait"] == "one\x1f"
        # Parked with its job at the fallback time, holding no worker slot.
        job = (await fetch(engine, "SELECT run_at FROM durable.jobs WHERE run_id = $1", second))[0]
        assert job["run_at"] == waiting["wake_at"]
        gate.set()
        await engine.wait(first, timeout=10)
        result = await engine.wait(second, timeout=10)
        assert (await engine.get_run(second)).status is durable.RunStatus.COMPLETED
        ran_at = await fetchval(engine, "SELECT $1::text::timestamptz", result["hold"])
    # The holder's commit woke it, well before its fallback time.
    assert ran_at < waiting["wake_at"]


async def test_a_leased_step_holds_its_slot_for_the_lease(db: Any) -> None:
    wf = durable.Workflow("leased_limited")

    @wf.step(limit="ext", transactional=False)
    async def call(ctx: durable.Context) -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.execute(
                "INSERT INTO calls VALUES ($1, '', $2, clock_timestamp(), NULL)",
                ctx.run_id,
                ctx.attempt,
            )
            await asyncio.sleep(0.1)
            await conn.execute(
                "UPDATE calls SET ended_at = clock_timestamp() WHERE run_id = $1", ctx.run_id
            )
        finally:
            await conn.close()

    limits = {"ext": durable.Limit(concurrency=1, rate=100)}
    async with running_engine(db, wf, setup=CALLS, concurrency=6, limits=limits) as engine:
        ids = [await engine.start(wf, {}) for _ in range(4)]
        for run_id in ids:
            await engine.wait(run_id, timeout=30)
        rows = await _calls(engine)
        usage = await engine.limit_usage()
    assert len(rows) == 4
    assert max_overlap([(r["started_at"], r["ended_at"]) for r in rows]) == 1
    assert {r["attempt"] for r in rows} == {1}
    assert [u.in_flight for u in usage] == [0]


async def test_a_limit_key_that_raises_fails_the_attempt(db: Any) -> None:
    wf = durable.Workflow("bad_key")

    async def noop(ctx: durable.Context) -> None:
        return None

    wf.step(
        "call",
        noop,
        limit="api",
        limit_key=lambda ctx: ctx.input["missing"],
        max_attempts=2,
        backoff=0,
    )
    async with running_engine(db, wf, limits={"api": durable.Limit(rate=10)}) as engine:
        run_id = await engine.start(wf, {})
        with pytest.raises(durable.RunFailed, match="KeyError"):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
    assert [a.attempt for a in run.attempts] == [1, 2]


def test_limits_are_checked_when_declared() -> None:
    with pytest.raises(durable.ArgumentError):
        durable.Limit()
    with pytest.raises(durable.ArgumentError):
        durable.Limit(rate=0)
    with pytest.raises(durable.ArgumentTypeError):
        durable.Limit(concurrency=1.5)  # type: ignore[arg-type]
    with pytest.raises(durable.ArgumentError):
        durable.Limit(rate=1, per=0)
    wf = durable.Workflow("uses_limit")

    async def noop(ctx: durable.Context) -> None:
        return None

    wf.step("call", noop, limit="stripe")
    with pytest.raises(durable.DefinitionError, match="stripe"):
        durable.Engine("postgresql://x/y", workflows=[wf])
    with pytest.raises(durable.ConfigurationError):
        durable.Engine("postgresql://x/y", limits={"a\x1fb": durable.Limit(rate=1)})
    engine = durable.Engine(
        "postgresql://x/y", workflows=[wf], limits={"stripe": durable.Limit(rate=1)}
    )
    assert engine.limits == {"stripe": durable.Limit(rate=1)}
    with pytest.raises(durable.DefinitionError, match="limit_key needs a limit"):
        durable.Workflow("w").step("s", noop, limit_key=lambda ctx: "k")


async def test_open_engine_helper_is_used(db: Any) -> None:
    async with open_engine(db) as engine:
        assert await engine.limit_usage() == []
