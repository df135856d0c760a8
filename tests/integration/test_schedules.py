"""Schedules (issue 14) against a real database: each tick starts exactly one run, overlap
and catch-up policies, DST in Europe/Paris, trigger, pause and resume.

Time moves by the database clock, never by sleeping: `at()` sets the database's
`durable.clock_offset` so that its new sessions see the given instant, then opens an
engine whose worker (and so whose scheduler) starts at that instant. A gap with no worker
is two `at()` blocks hours apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import eventually, execute, fetch, fetchval

import durable


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def report() -> durable.Workflow:
    wf = durable.Workflow("report")

    @wf.step
    async def make(ctx: durable.Context) -> str:
        return str(ctx.input["scheduled_at"])

    return wf


def held() -> durable.Workflow:
    """A workflow whose runs stay active (waiting) until signalled."""
    wf = durable.Workflow("held")
    wf.wait_for_signal("go", "go")
    return wf


class Clock:
    """Moves the database clock of one test database (for sessions opened afterwards)."""

    def __init__(self, server_dsn: str, db: Any) -> None:
        self.server_dsn = server_dsn
        self.db = db

    async def set(self, when: datetime) -> None:
        admin = await asyncpg.connect(self.server_dsn)
        try:
            real: datetime = await admin.fetchval("SELECT clock_timestamp()")
            offset = (when - real).total_seconds()
            await admin.execute(
                f"ALTER DATABASE \"{self.db.name}\" SET durable.clock_offset = '{offset:.6f}'"
            )
        finally:
            await admin.close()


@pytest.fixture
def clock(server_dsn: str, db: Any) -> Clock:
    return Clock(server_dsn, db)


@asynccontextmanager
async def at(
    clock: Clock,
    when: datetime,
    workflows: list[durable.Workflow],
    schedules: list[durable.Schedule],
    *,
    worker: bool = True,
) -> AsyncIterator[durable.Engine]:
    """An engine whose database clock reads `when`, with a worker unless told not to."""
    await clock.set(when)
    engine = durable.Engine(clock.db.dsn, workflows=workflows, schedules=schedules)
    async with engine:
        await engine.schedules()  # declares them, as a worker's start would
        if worker:
            async with engine.worker(concurrency=4, poll_interval=0.05, grace_period=2.0):
                yield engine
        else:
            yield engine


async def info(engine: durable.Engine, name: str) -> durable.ScheduleInfo:
    return next(s for s in await engine.schedules() if s.name == name)


async def advanced_to(engine: durable.Engine, name: str, next_at: datetime) -> None:
    """Wait until a scheduler has handled schedule `name` up to `next_at` (the row moves in
    the transaction that starts its runs)."""

    async def moved() -> bool:
        return (await info(engine, name)).next_at == next_at

    await eventually(moved)


async def scheduled_runs(engine: durable.Engine) -> list[tuple[str, str, str]]:
    """(scheduled_at, idempotency key, status) of every run, by scheduled_at."""
    rows = await fetch(
        engine,
        "SELECT input->>'scheduled_at' AS at, idempotency_key, status FROM durable.runs "
        "ORDER BY input->>'scheduled_at', id",
    )
    return [(r["at"], r["idempotency_key"], r["status"]) for r in rows]


# -- one run per tick -----------------------------------------------------------------------


async def test_a_due_tick_starts_one_run_with_scheduled_at_and_the_tick_as_its_key(
    clock: Clock,
) -> None:
    wf = report()
    hourly = durable.Schedule(
        "hourly", cron="0 * * * *", workflow="report", input={"kind": "hourly"}
    )
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [hourly], worker=False) as engine:
        s = await info(engine, "hourly")
        assert (s.next_at, s.paused, s.last_run_id) == (utc(2025, 6, 1, 10), False, None)
        assert (s.cron, s.timezone, s.overlap, s.catch_up) == ("0 * * * *", "UTC", "skip", "latest")
    async with at(clock, utc(2025, 6, 1, 10, 0, 5), [wf], [hourly]) as engine:
        await advanced_to(engine, "hourly", utc(2025, 6, 1, 11))
        s = await info(engine, "hourly")
        assert s.last_tick == utc(2025, 6, 1, 10)
        assert s.last_run_id is not None
        assert await engine.wait(s.last_run_id, timeout=10) == {"make": "2025-06-01T10:00:00+00:00"}
        run = await engine.get_run(s.last_run_id)
        assert run.input == {"kind": "hourly", "scheduled_at": "2025-06-01T10:00:00+00:00"}
        assert await scheduled_runs(engine) == [
            ("2025-06-01T10:00:00+00:00", "schedule:hourly:2025-06-01T10:00:00+00:00", "completed")
        ]
        assert (await info(engine, "hourly")).last_run_status is durable.RunStatus.COMPLETED


async def test_three_schedulers_fire_twenty_missed_ticks_exactly_once_each(clock: Clock) -> None:
    wf = report()
    every = durable.Schedule(
        "every-minute", cron="* * * * *", workflow="report", catch_up="all", overlap="allow"
    )
    async with at(clock, utc(2025, 6, 1, 10, 0, 30), [wf], [every], worker=False):
        pass
    # Twenty ticks (10:01 ... 10:20) fall due at once for three workers on three engines.
    await clock.set(utc(2025, 6, 1, 10, 20, 30))
    engines = [durable.Engine(clock.db.dsn, workflows=[wf], schedules=[every]) for _ in range(3)]
    for e in engines:
        await e.open()
    try:
        workers = [e.worker(concurrency=2, poll_interval=0.05) for e in engines]
        for w in workers:
            await w.__aenter__()
        try:
            await advanced_to(engines[0], "every-minute", utc(2025, 6, 1, 10, 21))

            async def all_done() -> bool:
                return (
                    await fetchval(
                        engines[0], "SELECT count(*) FROM durable.runs WHERE status <> 'completed'"
                    )
                    == 0
                )

            await eventually(all_done)
        finally:
            for w in reversed(workers):
                await w.__aexit__(None, None, None)
        runs = await scheduled_runs(engines[0])
    finally:
        for e in engines:
            await e.close()
    expected = [(utc(2025, 6, 1, 10, m)).isoformat() for m in range(1, 21)]
    assert [r[0] for r in runs] == expected
    assert len({r[1] for r in runs}) == 20


async def test_a_redeclared_cron_starts_from_its_next_tick_and_an_unchanged_one_keeps_its_place(
    clock: Clock,
) -> None:
    wf = report()
    hourly = durable.Schedule("s", cron="0 * * * *", workflow="report")
    async with at(clock, utc(2025, 6, 1, 9, 30), [wf], [hourly], worker=False) as engine:
        assert (await info(engine, "s")).next_at == utc(2025, 6, 1, 10)
    # Same definition, a gap later: the row keeps 10:00, so catch-up sees the missed ticks.
    async with at(clock, utc(2025, 6, 1, 12, 30), [wf], [hourly], worker=False) as engine:
        assert (await info(engine, "s")).next_at == utc(2025, 6, 1, 10)
    daily = durable.Schedule("s", cron="0 3 * * *", workflow="report", timezone="Europe/Paris")
    async with at(clock, utc(2025, 6, 1, 12, 30), [wf], [daily], worker=False) as engine:
        s = await info(engine, "s")
        assert (s.cron, s.timezone, s.next_at) == ("0 3 * * *", "Europe/Paris", utc(2025, 6, 2, 1))


# -- catch-up after a gap with no worker ----------------------------------------------------


@pytest.mark.parametrize(
    ("catch_up", "max_catch_up", "hours"),
    [
        ("none", 100, []),
        ("latest", 100, [15]),
        ("all", 100, [10, 11, 12, 13, 14, 15]),
        ("all", 3, [13, 14, 15]),
    ],
)
async def test_catch_up_after_a_gap_with_no_worker(
    clock: Clock, catch_up: Any, max_catch_up: int, hours: list[int]
) -> None:
    wf = report()
    hourly = durable.Schedule(
        "hourly",
        cron="0 * * * *",
        workflow="report",
        overlap="allow",
        catch_up=catch_up,
        max_catch_up=max_catch_up,
    )
    # Declared at 09:30; no worker until 15:20, so 10:00 ... 15:00 were missed.
    async with at(clock, utc(2025, 6, 1, 9, 30), [wf], [hourly], worker=False):
        pass
    async with at(clock, utc(2025, 6, 1, 15, 20), [wf], [hourly]) as engine:
        await advanced_to(engine, "hourly", utc(2025, 6, 1, 16))
        runs = await scheduled_runs(engine)
    assert [r[0] for r in runs] == [utc(2025, 6, 1, h).isoformat() for h in hours]


async def test_a_tick_less_than_a_minute_late_is_on_time_even_with_catch_up_none(
    clock: Clock,
) -> None:
    wf = report()
    hourly = durable.Schedule("hourly", cron="0 * * * *", workflow="report", catch_up="none")
    async with at(clock, utc(2025, 6, 1, 9, 30), [wf], [hourly], worker=False):
        pass
    # A worker restarting (a deploy) 40 s after the tick still runs it.
    async with at(clock, utc(2025, 6, 1, 10, 0, 40), [wf], [hourly]) as engine:
        await advanced_to(engine, "hourly", utc(2025, 6, 1, 11))
        assert [r[0] for r in await scheduled_runs(engine)] == ["2025-06-01T10:00:00+00:00"]


# -- overlap --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", ["skip", "allow", "cancel_previous"])
async def test_overlap_when_the_previous_run_is_still_active(clock: Clock, overlap: Any) -> None:
    wf = held()
    s = durable.Schedule("held", cron="0 * * * *", workflow="held", overlap=overlap)
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [s], worker=False):
        pass
    async with at(clock, utc(2025, 6, 1, 10, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "held", utc(2025, 6, 1, 11))
        first = (await info(engine, "held")).last_run_id
        assert first is not None

        async def waiting() -> bool:
            return (await engine.get_run(first)).status is durable.RunStatus.WAITING

        await eventually(waiting)
    async with at(clock, utc(2025, 6, 1, 11, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "held", utc(2025, 6, 1, 12))
        last = (await info(engine, "held")).last_run_id
        runs = await engine.list_runs(workflow="held")
        statuses = {r.id: r.status.value for r in runs}
        if overlap == "skip":
            assert last == first
            assert statuses == {first: "waiting"}
        elif overlap == "allow":
            assert last != first
            assert statuses[first] == "waiting"
            assert statuses[last] in ("pending", "waiting")
            assert len(statuses) == 2
        else:
            assert last != first
            assert statuses[first] == "cancelled"
            assert statuses[last] in ("pending", "waiting")
            assert "replaced by tick 2025-06-01T11:00:00+00:00" in str(
                (await engine.get_run(first)).error
            )
        for run_id, status in statuses.items():
            if status != "cancelled":
                await engine.signal(run_id, "go")
                await engine.wait(run_id, timeout=10)


async def test_skip_lets_the_next_tick_run_once_the_previous_run_finished(clock: Clock) -> None:
    wf = held()
    s = durable.Schedule("held", cron="0 * * * *", workflow="held", overlap="skip")
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [s], worker=False):
        pass
    async with at(clock, utc(2025, 6, 1, 10, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "held", utc(2025, 6, 1, 11))
        first = (await info(engine, "held")).last_run_id
        assert first is not None

        async def waiting() -> bool:
            return (await engine.get_run(first)).status is durable.RunStatus.WAITING

        await eventually(waiting)
        await engine.signal(first, "go")
        await engine.wait(first, timeout=10)
    async with at(clock, utc(2025, 6, 1, 11, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "held", utc(2025, 6, 1, 12))
        second = (await info(engine, "held")).last_run_id
        assert second not in (None, first)
        assert second is not None
        await engine.signal(second, "go")
        await engine.wait(second, timeout=10)


# -- time zones and DST ---------------------------------------------------------------------

PARIS = "Europe/Paris"


async def test_a_paris_0230_daily_schedule_on_the_spring_forward_day(clock: Clock) -> None:
    wf = report()
    s = durable.Schedule(
        "paris", cron="30 2 * * *", workflow="report", timezone=PARIS, overlap="allow"
    )
    async with at(clock, utc(2025, 3, 29, 12), [wf], [s], worker=False) as engine:
        # 02:30 does not exist on 2025-03-30: the tick is 03:00 CEST, when the gap ends.
        assert (await info(engine, "paris")).next_at == utc(2025, 3, 30, 1, 0)
    async with at(clock, utc(2025, 3, 30, 1, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "paris", utc(2025, 3, 31, 0, 30))
        assert [r[0] for r in await scheduled_runs(engine)] == ["2025-03-30T03:00:00+02:00"]
    async with at(clock, utc(2025, 3, 31, 0, 30, 5), [wf], [s]) as engine:
        await advanced_to(engine, "paris", utc(2025, 4, 1, 0, 30))
        assert [r[0] for r in await scheduled_runs(engine)] == [
            "2025-03-30T03:00:00+02:00",
            "2025-03-31T02:30:00+02:00",
        ]


async def test_a_paris_0230_daily_schedule_on_the_fall_back_day_runs_once(clock: Clock) -> None:
    wf = report()
    s = durable.Schedule("paris", cron="30 2 * * *", workflow="report", timezone=PARIS)
    # Fires every minute: when its run appears, a scheduler pass saw the clock's instant.
    probe = durable.Schedule("probe", cron="* * * * *", workflow="report", overlap="allow")
    async with at(clock, utc(2025, 10, 25, 12), [wf], [s, probe], worker=False) as engine:
        assert (await info(engine, "paris")).next_at == utc(2025, 10, 26, 0, 30)
    # The first 02:30 (CEST).
    async with at(clock, utc(2025, 10, 26, 0, 30, 5), [wf], [s, probe]) as engine:
        await advanced_to(engine, "paris", utc(2025, 10, 27, 1, 30))
    # The second 02:30 (CET), an hour later: no second run that day.
    async with at(clock, utc(2025, 10, 26, 1, 30, 5), [wf], [s, probe]) as engine:
        await advanced_to(engine, "probe", utc(2025, 10, 26, 1, 31))
        runs = await fetch(
            engine,
            "SELECT input->>'scheduled_at' AS at FROM durable.runs "
            "WHERE idempotency_key LIKE 'schedule:paris:%' ORDER BY 1",
        )
        assert [r["at"] for r in runs] == ["2025-10-26T02:30:00+02:00"]
        assert (await info(engine, "paris")).next_at == utc(2025, 10, 27, 1, 30)


# -- trigger, pause, resume -----------------------------------------------------------------


async def test_trigger_starts_a_run_now_and_follows_overlap(clock: Clock) -> None:
    wf = held()
    s = durable.Schedule("held", cron="0 3 * * *", workflow="held", input={"k": 1})
    async with at(clock, utc(2025, 6, 1, 12, 0, 0), [wf], [s]) as engine:
        first = await engine.trigger("held")
        assert first is not None
        run = await engine.get_run(first)
        assert run.input["k"] == 1
        stamped = datetime.fromisoformat(run.input["scheduled_at"])
        assert abs(stamped - utc(2025, 6, 1, 12)) < timedelta(seconds=30)
        # overlap="skip": the first run is still active, so a second trigger starts nothing.
        assert await engine.trigger("held") is None
        s_info = await info(engine, "held")
        assert (s_info.last_run_id, s_info.next_at) == (first, utc(2025, 6, 2, 3))
        assert s_info.last_tick == datetime.fromisoformat(run.input["scheduled_at"])
        await engine.signal(first, "go")
        await engine.wait(first, timeout=10)
        second = await engine.trigger("held")
        assert second not in (None, first)
        assert second is not None
        await engine.signal(second, "go")
        await engine.wait(second, timeout=10)
        with pytest.raises(durable.ScheduleNotFound, match="not declared by this engine"):
            await engine.trigger("nope")


async def test_a_paused_schedule_starts_nothing_and_resumes_from_its_next_tick(
    clock: Clock,
) -> None:
    wf = report()
    hourly = durable.Schedule("hourly", cron="0 * * * *", workflow="report", catch_up="all")
    probe = durable.Schedule("probe", cron="* * * * *", workflow="report", overlap="allow")
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [hourly, probe], worker=False) as e:
        assert await e.pause_schedule("hourly") is True
        assert await e.pause_schedule("hourly") is False
        s = await info(e, "hourly")
        assert (s.paused, s.next_at) == (True, None)
        with pytest.raises(durable.ScheduleNotFound):
            await e.pause_schedule("nope")
    async with at(clock, utc(2025, 6, 1, 12, 0, 5), [wf], [hourly, probe]) as engine:
        await advanced_to(engine, "probe", utc(2025, 6, 1, 12, 1))
        assert (
            await fetchval(
                engine,
                "SELECT count(*) FROM durable.runs WHERE idempotency_key LIKE 'schedule:hourly:%'",
            )
            == 0
        )
        # Resumed at 12:00:05: the ticks that passed while paused (10:00 ... 12:00) stay
        # unrun, even with catch_up="all".
        assert await engine.resume_schedule("hourly") is True
        assert await engine.resume_schedule("hourly") is False
        s = await info(engine, "hourly")
        assert (s.paused, s.next_at) == (False, utc(2025, 6, 1, 13))
        with pytest.raises(durable.ScheduleNotFound):
            await engine.resume_schedule("nope")
    async with at(clock, utc(2025, 6, 1, 13, 0, 5), [wf], [hourly]) as engine:
        await advanced_to(engine, "hourly", utc(2025, 6, 1, 14))
        rows = await fetch(
            engine,
            "SELECT input->>'scheduled_at' AS at FROM durable.runs "
            "WHERE idempotency_key LIKE 'schedule:hourly:%'",
        )
        assert [r["at"] for r in rows] == ["2025-06-01T13:00:00+00:00"]


async def test_schedules_lists_rows_other_engines_declared(clock: Clock) -> None:
    wf = report()
    a = durable.Schedule("a", cron="0 * * * *", workflow="report")
    async with at(clock, utc(2025, 6, 1, 9, 30), [wf], [a], worker=False):
        pass
    async with at(clock, utc(2025, 6, 1, 9, 30), [wf], [], worker=False) as engine:
        assert [s.name for s in await engine.schedules()] == ["a"]
        # Pause and resume work on any schedule in the database; trigger needs the code.
        assert await engine.pause_schedule("a") is True
        assert await engine.resume_schedule("a") is True
        with pytest.raises(durable.ScheduleNotFound):
            await engine.trigger("a")


async def test_purging_the_last_run_clears_it_from_the_schedule(clock: Clock) -> None:
    wf = report()
    s = durable.Schedule("s", cron="0 3 * * *", workflow="report")
    async with at(clock, utc(2025, 6, 1, 12), [wf], [s]) as engine:
        run_id = await engine.trigger("s")
        assert run_id is not None
        await engine.wait(run_id, timeout=10)
        assert await engine.purge(older_than=timedelta(0)) == 1
        s_info = await info(engine, "s")
        assert (s_info.last_run_id, s_info.last_run_status) == (None, None)


# -- bounded failure ------------------------------------------------------------------------

REFUSE_BAD_RUNS = """
CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.input->>'kind' = 'bad' THEN
        RAISE EXCEPTION 'refusing a bad run';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_bad BEFORE INSERT ON durable.runs
    FOR EACH ROW EXECUTE FUNCTION refuse_bad();
"""


async def test_a_schedule_that_cannot_fire_waits_while_the_others_fire(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    wf = report()
    bad = durable.Schedule("bad", cron="0 * * * *", workflow="report", input={"kind": "bad"})
    good = durable.Schedule("good", cron="0 * * * *", workflow="report", input={"kind": "ok"})
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [bad, good], worker=False) as e:
        await execute(e, REFUSE_BAD_RUNS)
    async with at(clock, utc(2025, 6, 1, 10, 0, 5), [wf], [bad, good]) as engine:
        await advanced_to(engine, "good", utc(2025, 6, 1, 11))

        async def logged() -> bool:
            return any("schedule bad: firing failed" in r.getMessage() for r in caplog.records)

        await eventually(logged)
        # The tick stays due (its transaction rolled back) and the worker goes on.
        assert (await info(engine, "bad")).next_at == utc(2025, 6, 1, 10)
        # The refusal ends (the function, not the trigger: dropping a trigger of the
        # partitioned runs table locks every partition, under a worker's feet).
        await execute(
            engine,
            "CREATE OR REPLACE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN NEW; END $$",
        )
        await advanced_to(engine, "bad", utc(2025, 6, 1, 11))
        rows = await fetch(engine, "SELECT input->>'kind' AS kind FROM durable.runs ORDER BY 1")
        assert [r["kind"] for r in rows] == ["bad", "ok"]


async def test_a_tick_whose_key_names_a_run_with_another_input_starts_nothing(
    clock: Clock,
) -> None:
    wf = report()
    s = durable.Schedule("s", cron="0 * * * *", workflow="report", input={"v": 2})
    async with at(clock, utc(2025, 6, 1, 9, 59, 50), [wf], [s], worker=False) as engine:
        # A run an older release started for the 10:00 tick, with its own input.
        old = await engine.start(
            "report",
            {"v": 1, "scheduled_at": "2025-06-01T10:00:00+00:00"},
            idempotency_key="schedule:s:2025-06-01T10:00:00+00:00",
        )
    async with at(clock, utc(2025, 6, 1, 10, 0, 5), [wf], [s]) as engine:
        await advanced_to(engine, "s", utc(2025, 6, 1, 11))
        assert [r.id for r in await engine.list_runs()] == [old]
        assert (await info(engine, "s")).last_run_id is None
