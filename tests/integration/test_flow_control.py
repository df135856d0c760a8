"""Flow control of runs (SPEC, Flow control; docs/guides/flow-control.md): a bound on a
workflow's active runs per key, priorities, delayed starts on the database clock,
singleton and debounced starts, paused workflows. Bounds are measured from what the
handlers themselves wrote through `ctx.conn`, not from durable's own tables."""

from __future__ import annotations

import asyncio
import io
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from helpers import eventually, fetch, fetchval, open_engine, running_engine

import durable
from durable.cli import main as cli_main

ACTIVE = """
CREATE TABLE active (
    run_id text PRIMARY KEY, key text NOT NULL, started_at timestamptz NOT NULL,
    ended_at timestamptz
);
CREATE TABLE seen (seq bigserial, run_id text NOT NULL, tag text);
"""


def max_overlap(intervals: Iterable[tuple[Any, Any]]) -> int:
    """The most intervals [start, end] open at one instant (an end before a start at the
    same instant: the slot freed first)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    top = now = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


async def _shift_clock(server_dsn: str, database: str, seconds: float) -> None:
    """New sessions of `database` see the database clock `seconds` ahead."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"ALTER DATABASE \"{database}\" SET durable.clock_offset = '{seconds}'")
    finally:
        await admin.close()


async def _order(engine: durable.Engine) -> list[str]:
    rows = await fetch(engine, "SELECT run_id FROM seen ORDER BY seq")
    return [r["run_id"] for r in rows]


def _recording(name: str, **options: Any) -> durable.Workflow:
    """One step that records, in order, which run ran it."""
    wf = durable.Workflow(name, **options)

    @wf.step
    async def record(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO seen (run_id) VALUES ($1)", ctx.run_id)
        return ctx.run_id

    return wf


# -- a bound on active runs ----------------------------------------------------------------


def bounded() -> durable.Workflow:
    wf = durable.Workflow("bounded", concurrency=2, concurrency_key=lambda i: i["k"])

    @wf.step
    async def begin(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO active VALUES ($1, $2, clock_timestamp(), NULL)",
            ctx.run_id,
            ctx.input["k"],
        )

    wf.sleep("hold", 0.05)  # a waiting run is active too: it keeps its slot

    @wf.step
    async def end(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await asyncio.sleep(0.02)
        await ctx.conn.execute(
            "UPDATE active SET ended_at = clock_timestamp() WHERE run_id = $1", ctx.run_id
        )

    return wf


async def test_at_most_n_runs_per_key_are_active_as_the_handlers_saw_them(db: Any) -> None:
    wf = bounded()
    keys = ("a", "b", "c")
    async with open_engine(db, wf, setup=ACTIVE) as engine:
        ids = [await engine.start(wf, {"k": k, "i": i}) for i in range(6) for k in keys]
        # Two per key took a slot at start and have a job; the others wait without one.
        slots = await fetch(
            engine,
            "SELECT concurrency_key, slot, count(*) AS n, "
            "count(*) FILTER (WHERE EXISTS (SELECT 1 FROM durable.jobs j WHERE j.run_id = r.id))"
            " AS with_job "
            "FROM durable.runs r GROUP BY 1, 2 ORDER BY 1, 2",
        )
        assert [tuple(r) for r in slots] == [
            (k, s, n, n if s == "held" else 0)
            for k in keys
            for s, n in (("held", 2), ("queued", 4))
        ]
        statuses = {(await engine.get_run(i)).status for i in ids}
        assert statuses == {durable.RunStatus.PENDING}
        async with engine.worker(concurrency=8, poll_interval=0.05):
            for run_id in ids:
                await engine.wait(run_id, timeout=60)
        rows = await fetch(engine, "SELECT key, started_at, ended_at FROM active")
    assert len(rows) == len(ids)
    per_key: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for r in rows:
        per_key[r["key"]].append((r["started_at"], r["ended_at"]))
    # Never more than two at once per key, and the bound was reached (it did not serialise).
    assert {k: max_overlap(v) for k, v in per_key.items()} == {k: 2 for k in keys}


async def test_queued_runs_start_in_priority_then_fifo_order(db: Any) -> None:
    wf = _recording("one_at_a_time", concurrency=1)
    async with open_engine(db, wf, setup=ACTIVE) as engine:
        first = await engine.start(wf, {})  # takes the slot
        named = {}
        for name, priority in [("b", 0), ("c", 5), ("d", 0), ("e", 10), ("f", -3), ("g", 5)]:
            named[name] = await engine.start(wf, {"n": name}, priority=priority)
        async with engine.worker(concurrency=4, poll_interval=0.05):
            for run_id in [first, *named.values()]:
                await engine.wait(run_id, timeout=30)
        order = await _order(engine)
    by_id = {v: k for k, v in named.items()} | {first: "a"}
    assert [by_id[r] for r in order] == ["a", "e", "c", "g", "b", "d", "f"]


async def test_a_delayed_run_takes_its_slot_when_due_not_when_started(
    db: Any, server_dsn: str
) -> None:
    wf = _recording("bounded_later", concurrency=1)
    async with running_engine(db, wf, setup=ACTIVE) as engine:
        later = await engine.start(wf, {}, delay=3600)
        now = await engine.start(wf, {})  # the slot is free: the delayed run holds none
        await engine.wait(now, timeout=10)
        row = await fetch(
            engine,
            "SELECT r.slot, j.task, j.run_at - durable.now_v1() AS due_in FROM durable.runs r "
            "JOIN durable.jobs j ON j.run_id = r.id WHERE r.id = $1",
            later,
        )
        assert row[0]["slot"] is None
        assert row[0]["task"] == "admit"
        assert timedelta(minutes=59) < row[0]["due_in"] <= timedelta(hours=1)
    await _shift_clock(server_dsn, db.name, 3660)
    async with running_engine(db, wf) as engine:
        await engine.wait(later, timeout=10)


async def test_a_cancelled_or_failed_run_frees_its_slot(db: Any) -> None:
    wf = durable.Workflow("fragile", concurrency=1)
    wf.wait_for_signal("go", "go")

    @wf.step
    async def check(ctx: durable.Context) -> str:
        if ctx.input.get("fail"):
            raise durable.NonRetryable("no")
        return "ok"

    async with running_engine(db, wf) as engine:
        a = await engine.start(wf, {"fail": True})
        b = await engine.start(wf, {})
        c = await engine.start(wf, {})
        assert await fetchval(engine, "SELECT slot FROM durable.runs WHERE id = $1", b) == "queued"
        await engine.signal(a, "go")
        with pytest.raises(durable.RunFailed):
            await engine.wait(a, timeout=10)

        async def b_waits() -> bool:
            return (await engine.get_run(b)).status is durable.RunStatus.WAITING

        await eventually(b_waits)
        await engine.cancel(b)
        await eventually(
            lambda: fetchval(engine, "SELECT slot = 'held' FROM durable.runs WHERE id = $1", c)
        )
        await engine.signal(c, "go")
        assert await engine.wait(c, timeout=10) == {"go": None, "check": "ok"}
        # A retried run takes a slot again, like a new one.
        assert await engine.retry(a)
        await engine.signal(a, "go")
        with pytest.raises(durable.RunFailed):
            await engine.wait(a, timeout=10)


async def test_a_child_run_counts_under_its_workflow_bound_with_its_parents_priority(
    db: Any,
) -> None:
    child = _recording("child_bounded", concurrency=1, concurrency_key=lambda i: i["k"])
    parent = durable.Workflow("parent")
    parent.child_workflow("kid", lambda ctx: ("child_bounded", {"k": ctx.input["k"]}))
    async with running_engine(db, parent, child, setup=ACTIVE) as engine:
        p = await engine.start(parent, {"k": "x"}, priority=7)
        await engine.wait(p, timeout=10)
        row = (
            await fetch(
                engine,
                "SELECT concurrency_key, concurrency, slot, priority FROM durable.runs "
                "WHERE parent_id = $1",
                p,
            )
        )[0]
    assert tuple(row) == ("x", 1, "held", 7)


# -- priorities ----------------------------------------------------------------------------


async def test_jobs_are_claimed_in_priority_order_and_carry_the_runs_priority(db: Any) -> None:
    wf = _recording("ranked")
    nap = durable.Workflow("nap").sleep("long", 3600)
    async with open_engine(db, wf, nap, setup=ACTIVE) as engine:
        named = {}
        for name, priority in [("a", 0), ("b", -100), ("c", 100), ("d", 0), ("e", 50)]:
            named[name] = await engine.start(wf, {}, priority=priority)
        sleeper = await engine.start(nap, {}, priority=-7)
        async with engine.worker(concurrency=1, poll_interval=0.05):
            for run_id in named.values():
                await engine.wait(run_id, timeout=30)

            async def parked() -> bool:
                return (await engine.get_run(sleeper)).status is durable.RunStatus.WAITING

            await eventually(parked)
        order = await _order(engine)
        job_priority = await fetchval(
            engine, "SELECT priority FROM durable.jobs WHERE run_id = $1", sleeper
        )
        await engine.cancel(sleeper)
    by_id = {v: k for k, v in named.items()}
    assert [by_id[r] for r in order] == ["c", "e", "a", "d", "b"]
    assert job_priority == -7


@pytest.mark.parametrize("bad", [101, -101, 2.5, True, "1"])
async def test_a_priority_out_of_range_is_refused_before_anything_is_written(
    db: Any, bad: Any
) -> None:
    wf = _recording("ranked")
    async with open_engine(db, wf) as engine:
        with pytest.raises((durable.ArgumentError, durable.ArgumentTypeError)):
            await engine.start(wf, {}, priority=bad)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 0


# -- delay / start_at ----------------------------------------------------------------------


async def test_delay_and_start_at_make_the_first_node_due_then_on_the_database_clock(
    db: Any, server_dsn: str
) -> None:
    wf = _recording("later")
    other = _recording("now")
    async with running_engine(db, wf, other, setup=ACTIVE) as engine:
        db_now = await fetchval(engine, "SELECT durable.now_v1()")
        delayed = await engine.start(wf, {}, delay=3600)
        scheduled = await engine.start(wf, {}, start_at=db_now + timedelta(hours=2))
        # The worker is alive and claiming: a run of another workflow completes meanwhile.
        await engine.wait(await engine.start(other, {}), timeout=10)
        for run_id in (delayed, scheduled):
            assert (await engine.get_run(run_id)).status is durable.RunStatus.PENDING
        due = await fetch(
            engine,
            "SELECT run_id, run_at - $1::timestamptz AS after FROM durable.jobs "
            "WHERE run_id = ANY($2::text[])",
            db_now,
            [delayed, scheduled],
        )
        after = {r["run_id"]: r["after"] for r in due}
        assert timedelta(hours=1) <= after[delayed] < timedelta(hours=1, seconds=5)
        assert after[scheduled] == timedelta(hours=2)
    await _shift_clock(server_dsn, db.name, 3660)
    async with running_engine(db, wf, other) as engine:
        await engine.wait(delayed, timeout=10)
        assert (await engine.get_run(scheduled)).status is durable.RunStatus.PENDING
        # `delay` counts from the database clock (shifted here), not the host's.
        shifted = await engine.start(wf, {}, delay=60)
        lag = await fetchval(
            engine,
            "SELECT extract(epoch FROM run_at - durable.now_v1()) FROM durable.jobs "
            "WHERE run_id = $1",
            shifted,
        )
        assert 55 < lag <= 60
        await engine.cancel(shifted)
    await _shift_clock(server_dsn, db.name, 7260)
    async with running_engine(db, wf) as engine:
        await engine.wait(scheduled, timeout=10)


async def test_bad_delays_are_refused(db: Any) -> None:
    wf = _recording("later")
    soon = datetime.now(UTC) + timedelta(hours=1)
    async with open_engine(db, wf) as engine:
        for kwargs in (
            {"delay": -1},
            {"delay": float("nan")},
            {"delay": 5, "start_at": soon},  # both
            {"start_at": "tomorrow"},
            {"start_at": datetime(2030, 1, 1)},  # naive
        ):
            with pytest.raises((durable.ArgumentError, durable.ArgumentTypeError)):
                await engine.start(wf, {}, **kwargs)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 0


# -- singleton -----------------------------------------------------------------------------


async def test_a_singleton_key_returns_the_active_run_until_it_finishes(db: Any) -> None:
    wf = _recording("single")
    async with open_engine(db, wf, setup=ACTIVE) as engine:
        ids = await asyncio.gather(
            *(engine.start(wf, {"i": i}, singleton_key="shop-7") for i in range(8))
        )
        assert len(set(ids)) == 1
        other = await engine.start(wf, {}, singleton_key="shop-8")
        assert other not in ids
        async with engine.worker(concurrency=2, poll_interval=0.05):
            await engine.wait(ids[0], timeout=10)
            again = await engine.start(wf, {}, singleton_key="shop-7")
            assert again != ids[0]
            await engine.wait(again, timeout=10)
            await engine.wait(other, timeout=10)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 3


# -- debounce ------------------------------------------------------------------------------


def _echo(name: str) -> durable.Workflow:
    wf = durable.Workflow(name)

    @wf.step
    async def take(ctx: durable.Context) -> Any:
        return ctx.input["n"]

    return wf


async def test_debounced_starts_coalesce_into_one_run_with_the_latest_input(
    db: Any, server_dsn: str
) -> None:
    wf = _echo("reindex")
    window = durable.Debounce(key="shop-7", seconds=30)
    async with running_engine(db, wf) as engine:
        ids = [await engine.start(wf, {"n": n}, debounce=window) for n in range(5)]
        other = await engine.start(wf, {"n": 99}, debounce=durable.Debounce("shop-8", 30))
        assert len(set(ids)) == 1
        assert other != ids[0]
        run = await engine.get_run(ids[0])
        assert run.status is durable.RunStatus.PENDING
        assert run.input == {"n": 4}
        # Due `seconds` after the last start, on the database clock.
        lag = await fetchval(
            engine,
            "SELECT extract(epoch FROM run_at - durable.now_v1()) FROM durable.jobs "
            "WHERE run_id = $1",
            ids[0],
        )
        assert 25 < lag <= 30
    await _shift_clock(server_dsn, db.name, 31)
    async with running_engine(db, wf) as engine:
        assert await engine.wait(ids[0], timeout=10) == {"take": 4}
        assert await engine.wait(other, timeout=10) == {"take": 99}
        # The window closed when the run started: the next start makes a new run.
        later = await engine.start(wf, {"n": 5}, debounce=window)
        assert later != ids[0]
        await engine.cancel(later)


async def test_a_debounced_run_starts_at_max_wait_after_the_first_start(
    db: Any, server_dsn: str
) -> None:
    wf = _echo("reindex")
    window = durable.Debounce(key="shop-7", seconds=30, max_wait=60)
    async with open_engine(db, wf) as engine:
        first = await engine.start(wf, {"n": 1}, debounce=window)
    # 40 s later another start comes: 30 s more would be 70 s after the first; max_wait says 60.
    await _shift_clock(server_dsn, db.name, 40)
    async with open_engine(db, wf) as engine:
        assert await engine.start(wf, {"n": 2}, debounce=window) == first
        wait = await fetchval(
            engine,
            "SELECT extract(epoch FROM not_before - created_at) FROM durable.runs WHERE id = $1",
            first,
        )
        assert wait == pytest.approx(60, abs=0.01)
        due = await fetchval(
            engine,
            "SELECT j.run_at = r.not_before FROM durable.jobs j JOIN durable.runs r "
            "ON r.id = j.run_id WHERE r.id = $1",
            first,
        )
        assert due is True
    await _shift_clock(server_dsn, db.name, 61)
    async with running_engine(db, wf) as engine:
        assert await engine.wait(first, timeout=10) == {"take": 2}


async def test_debounce_does_not_go_with_options_that_decide_otherwise(db: Any) -> None:
    wf = _echo("reindex")
    window = durable.Debounce("k", 5)
    async with open_engine(db, wf) as engine:
        for kwargs in ({"delay": 1}, {"singleton_key": "s"}, {"idempotency_key": "i"}):
            with pytest.raises(durable.ArgumentError, match="debounce"):
                await engine.start(wf, {"n": 1}, debounce=window, **kwargs)
    with pytest.raises(durable.ArgumentError):
        durable.Debounce("", 5)
    with pytest.raises(durable.ArgumentError):
        durable.Debounce("k", -1)


# -- pause / resume ------------------------------------------------------------------------


async def test_pause_stops_claims_lets_attempts_in_flight_finish_and_resume_goes_on(
    db: Any,
) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = durable.Workflow("pausable")

    @wf.step
    async def first(ctx: durable.Context) -> int:
        entered.set()
        await gate.wait()
        return 1

    @wf.step
    async def second(ctx: durable.Context) -> int:
        return 2

    other = _echo("unpaused")
    async with running_engine(db, wf, other) as engine:
        run_id = await engine.start(wf, {})
        with anyio.fail_after(10):
            await entered.wait()
        assert await engine.pause(wf) is True
        assert await engine.pause("pausable") is False
        assert await engine.paused() == ["pausable"]
        gate.set()  # the attempt in flight finishes and commits

        async def first_done() -> bool:
            run = await engine.get_run(run_id)
            return run.current_node == "second"

        await eventually(first_done)
        fresh = await engine.start(wf, {})
        # The worker goes on claiming other workflows' jobs, not the paused one's.
        for n in range(3):
            await engine.wait(await engine.start(other, {"n": n}), timeout=10)
        run = await engine.get_run(run_id, journal=True)
        assert [e.key for e in run.journal] == ["first"]
        assert run.status is durable.RunStatus.RUNNING
        assert (await engine.get_run(fresh)).status is durable.RunStatus.PENDING
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 2
        assert await engine.resume(wf) is True
        assert await engine.resume(wf) is False
        assert await engine.wait(run_id, timeout=10) == {"first": 1, "second": 2}
        assert await engine.wait(fresh, timeout=10) == {"first": 1, "second": 2}
        assert await engine.paused() == []


async def test_the_cli_pauses_and_resumes_a_workflow(db: Any) -> None:
    def cli(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = cli_main(["--dsn", db.dsn, *argv], out=out)
        return code, out.getvalue()

    wf = _echo("cli_paused")
    async with open_engine(db, wf) as engine:
        assert await anyio.to_thread.run_sync(cli, "pause", "cli_paused") == (
            0,
            "workflow 'cli_paused' paused: workers stop claiming its jobs\n",
        )
        code, text = await anyio.to_thread.run_sync(cli, "pause", "cli_paused")
        assert code == 1
        assert "already paused" in text
        assert await engine.paused() == ["cli_paused"]
        code, text = await anyio.to_thread.run_sync(cli, "--json", "resume", "cli_paused")
        assert code == 0
        assert '"resumed": true' in text
        assert await engine.paused() == []
        code, text = await anyio.to_thread.run_sync(cli, "resume", "cli_paused")
        assert code == 1
        assert "was not paused" in text
