"""Schedules without a database: cron ticks in IANA zones across DST, and which due ticks
`plan()` fires under each catch-up policy (durable/schedule.py is pure)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable.schedule import ON_TIME, Cron, plan


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def forward(cron: Cron, start: datetime, n: int) -> list[datetime]:
    ticks, t = [], start
    for _ in range(n):
        t = cron.next_after(t)
        ticks.append(t)
    return ticks


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "needle"),
    [
        ("61 * * * *", "UTC", "invalid cron expression '61 * * * *'"),
        ("* * *", "UTC", "invalid cron expression"),
        ("", "UTC", "cron must be a non-empty string"),
        ("0 3 * * *", "Europe/Pariss", "unknown time zone 'Europe/Pariss'"),
        ("0 3 * * *", "../etc/passwd", "unknown time zone"),
        ("0 0 30 2 *", "UTC", "invalid cron expression"),
    ],
)
def test_a_bad_expression_or_zone_is_a_definition_error(
    expression: str, timezone: str, needle: str
) -> None:
    with pytest.raises(durable.DefinitionError, match=needle.replace("*", r"\*")):
        Cron(expression, timezone)


def test_macros_and_a_seconds_field() -> None:
    start = utc(2025, 1, 1, 10, 15, 30)
    assert Cron("@hourly").next_after(start) == utc(2025, 1, 1, 11)
    assert Cron("@daily").next_after(start) == utc(2025, 1, 2)
    assert Cron("@weekly").next_after(start) == utc(2025, 1, 5)  # a Sunday
    assert Cron("@monthly").next_after(start) == utc(2025, 2, 1)
    assert Cron("@yearly").next_after(start) == utc(2026, 1, 1)
    # Six fields: seconds first.
    assert forward(Cron("*/20 * * * * *"), start, 3) == [
        utc(2025, 1, 1, 10, 15, 40),
        utc(2025, 1, 1, 10, 16, 0),
        utc(2025, 1, 1, 10, 16, 20),
    ]


def test_next_after_is_strictly_after_and_back_from_includes_the_instant() -> None:
    cron = Cron("0 * * * *")
    assert cron.next_after(utc(2025, 1, 1, 10)) == utc(2025, 1, 1, 11)
    assert cron.back_from(utc(2025, 1, 1, 10), since=utc(2025, 1, 1), limit=2) == [
        utc(2025, 1, 1, 10),
        utc(2025, 1, 1, 9),
    ]
    assert cron.back_from(
        utc(2025, 1, 1, 10, 0, 0) - timedelta(microseconds=1), since=utc(2025, 1, 1), limit=1
    ) == [utc(2025, 1, 1, 9)]
    assert cron.back_from(utc(2025, 1, 1, 10), since=utc(2025, 1, 1, 9, 30), limit=5) == [
        utc(2025, 1, 1, 10)
    ]


# -- time zones and DST ---------------------------------------------------------------------

PARIS = "Europe/Paris"


def test_a_daily_0230_in_paris_on_the_spring_forward_day_fires_once_at_0300() -> None:
    # 2025-03-30: clocks go from 02:00 CET to 03:00 CEST; 02:30 does not exist that day.
    cron = Cron("30 2 * * *", PARIS)
    ticks = forward(cron, utc(2025, 3, 28, 12), 3)
    assert ticks == [utc(2025, 3, 29, 1, 30), utc(2025, 3, 30, 1, 0), utc(2025, 3, 31, 0, 30)]
    assert [cron.local(t).isoformat() for t in ticks] == [
        "2025-03-29T02:30:00+01:00",
        "2025-03-30T03:00:00+02:00",
        "2025-03-31T02:30:00+02:00",
    ]
    assert cron.back_from(utc(2025, 3, 31, 12), since=utc(2025, 3, 28, 12), limit=10) == list(
        reversed(ticks)
    )


def test_a_daily_0230_in_paris_on_the_fall_back_day_fires_once() -> None:
    # 2025-10-26: clocks go from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    cron = Cron("30 2 * * *", PARIS)
    ticks = forward(cron, utc(2025, 10, 24, 12), 3)
    assert ticks == [utc(2025, 10, 25, 0, 30), utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30)]
    assert [cron.local(t).isoformat() for t in ticks] == [
        "2025-10-25T02:30:00+02:00",
        "2025-10-26T02:30:00+02:00",
        "2025-10-27T02:30:00+01:00",
    ]
    # From inside the repeated hour (02:15 CET, after the first 02:30): not again that day.
    assert cron.next_after(utc(2025, 10, 26, 1, 15)) == utc(2025, 10, 27, 1, 30)
    assert cron.back_from(utc(2025, 10, 27, 12), since=utc(2025, 10, 24, 12), limit=10) == list(
        reversed(ticks)
    )


def test_an_hourly_schedule_follows_real_time_across_both_transitions() -> None:
    cron = Cron("0 * * * *", PARIS)
    # Local days of 23 and 25 hours still get one tick per real hour.
    spring = forward(cron, utc(2025, 3, 29, 23) - timedelta(seconds=1), 23)
    assert spring[-1] == utc(2025, 3, 30, 21)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(spring))
    autumn = forward(cron, utc(2025, 10, 25, 22) - timedelta(seconds=1), 25)
    assert autumn[-1] == utc(2025, 10, 26, 22)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(autumn))
    assert [cron.local(t).strftime("%H%z") for t in autumn[2:5]] == [
        "02+0200",
        "02+0100",
        "03+0100",
    ]
    every_ten = Cron("*/10 * * * *", PARIS)
    day = forward(every_ten, utc(2025, 10, 25, 22) - timedelta(seconds=1), 6 * 25)
    assert day[-1] == utc(2025, 10, 26, 22, 50)
    assert all(b - a == timedelta(minutes=10) for a, b in itertools.pairwise(day))


def test_a_daily_0300_in_paris_on_both_transition_days() -> None:
    cron = Cron("0 3 * * *", PARIS)
    assert [cron.local(t).isoformat() for t in forward(cron, utc(2025, 3, 29, 12), 2)] == [
        "2025-03-30T03:00:00+02:00",
        "2025-03-31T03:00:00+02:00",
    ]
    assert [cron.local(t).isoformat() for t in forward(cron, utc(2025, 10, 25, 12), 2)] == [
        "2025-10-26T03:00:00+01:00",
        "2025-10-27T03:00:00+01:00",
    ]


# -- which due ticks fire -------------------------------------------------------------------

HOURLY = Cron("0 * * * *")


def decide(catch_up: Any, now: datetime, next_at: datetime, max_catch_up: int = 100) -> Any:
    return plan(HOURLY, next_at=next_at, now=now, catch_up=catch_up, max_catch_up=max_catch_up)


def test_nothing_is_due_before_next_at() -> None:
    p = decide("all", utc(2025, 1, 1, 9, 59), utc(2025, 1, 1, 10))
    assert p.fire == ()
    assert p.next_at == utc(2025, 1, 1, 10)


@pytest.mark.parametrize("catch_up", ["none", "latest", "all"])
def test_a_tick_seen_within_a_minute_is_on_time_under_every_policy(catch_up: str) -> None:
    p = decide(catch_up, utc(2025, 1, 1, 10) + ON_TIME, utc(2025, 1, 1, 10))
    assert p.fire == (utc(2025, 1, 1, 10),)
    assert p.dropped == 0
    assert p.next_at == utc(2025, 1, 1, 11)


def test_after_a_gap_none_runs_nothing_and_moves_past_now() -> None:
    # Down from 09:30 to 15:20: ticks 10:00 ... 15:00 were missed.
    p = decide("none", utc(2025, 1, 1, 15, 20), utc(2025, 1, 1, 10))
    assert p.fire == ()
    assert p.next_at == utc(2025, 1, 1, 16)


def test_after_a_gap_none_still_runs_the_tick_that_is_on_time() -> None:
    p = decide("none", utc(2025, 1, 1, 15, 0, 30), utc(2025, 1, 1, 10))
    assert p.fire == (utc(2025, 1, 1, 15),)


def test_after_a_gap_latest_runs_the_most_recent_missed_tick_once() -> None:
    p = decide("latest", utc(2025, 1, 1, 15, 20), utc(2025, 1, 1, 10))
    assert p.fire == (utc(2025, 1, 1, 15),)
    assert p.next_at == utc(2025, 1, 1, 16)


def test_after_a_gap_all_runs_every_missed_tick_oldest_first() -> None:
    p = decide("all", utc(2025, 1, 1, 15, 20), utc(2025, 1, 1, 10))
    assert p.fire == tuple(utc(2025, 1, 1, h) for h in range(10, 16))
    assert (p.dropped, p.more) == (0, False)


def test_all_is_bounded_by_max_catch_up_keeping_the_most_recent() -> None:
    # 30 days down: 720 missed hourly ticks.
    p = decide("all", utc(2025, 1, 31, 0, 20), utc(2025, 1, 1, 1), max_catch_up=100)
    assert len(p.fire) == 100
    assert p.fire[-1] == utc(2025, 1, 31, 0)
    assert p.fire[0] == utc(2025, 1, 31, 0) - timedelta(hours=99)
    assert p.more is True
    # The current tick is not a catch-up: with it on time, 100 missed ones still run.
    q = decide("all", utc(2025, 1, 31, 0, 0, 10), utc(2025, 1, 1, 1), max_catch_up=100)
    assert len(q.fire) == 101


# -- the definition -------------------------------------------------------------------------


def test_schedule_validates_its_options() -> None:
    ok = {"cron": "0 3 * * *", "workflow": "report"}
    for bad, needle in [
        ({"overlap": "queue"}, "overlap must be one of 'skip', 'allow', 'cancel_previous'"),
        ({"catch_up": "some"}, "catch_up must be one of 'none', 'latest', 'all'"),
        ({"max_catch_up": 0}, "max_catch_up must be between 1 and 10000"),
        ({"max_catch_up": True}, "max_catch_up must be an integer"),
        ({"input": {"scheduled_at": "x"}}, "must not have the key 'scheduled_at'"),
        ({"input": [1]}, "input must be a mapping"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
    ]:
        with pytest.raises(durable.DefinitionError, match=needle):
            durable.Schedule("nightly", **{**ok, **bad})
    with pytest.raises(durable.SerializationError):
        durable.Schedule("nightly", **ok, input={"when": datetime.now()})
    with pytest.raises(durable.DefinitionError, match="schedule name"):
        durable.Schedule("", **ok)


def test_schedule_takes_a_workflow_or_its_name_and_stamps_each_tick() -> None:
    wf = durable.Workflow("report")
    s = durable.Schedule(
        "nightly", cron="0 3 * * *", workflow=wf, input={"kind": "daily"}, timezone=PARIS
    )
    assert (s.workflow, s.overlap, s.catch_up, s.max_catch_up) == ("report", "skip", "latest", 100)
    assert s.run_input(utc(2025, 7, 1, 1)) == {
        "kind": "daily",
        "scheduled_at": "2025-07-01T03:00:00+02:00",
    }
    assert "nightly" in repr(s)
    assert s.next_tick(utc(2025, 7, 1)) == utc(2025, 7, 1, 1)  # 03:00 CEST


def test_an_engine_refuses_a_schedule_of_an_unregistered_workflow_and_duplicates() -> None:
    wf = durable.Workflow("report")

    @wf.step
    async def make(ctx: durable.Context) -> None:
        return None

    s = durable.Schedule("nightly", cron="0 3 * * *", workflow="other")
    with pytest.raises(durable.DefinitionError, match="not registered"):
        durable.Engine("postgresql://x/y", workflows=[wf], schedules=[s])
    t = durable.Schedule("nightly", cron="0 3 * * *", workflow="report")
    with pytest.raises(durable.DefinitionError, match="two schedules are named 'nightly'"):
        durable.Engine("postgresql://x/y", workflows=[wf], schedules=[t, t])
