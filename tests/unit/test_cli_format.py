"""The `durable` command's pure parts: durations, the timeline, log lines, engine factories."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable.cli import FieldFormatter, human_duration, is_engine_factory, timeline_lines
from durable.model import JournalEntry, Run, RunStatus


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0004, "<1 ms"),
        (0.84, "840 ms"),
        (9.9, "9900 ms"),
        (12.44, "12.4 s"),
        (599, "599.0 s"),
        (852, "14.2 min"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_timeline_offsets_switch_to_seconds_and_minutes() -> None:
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

    def entry(key: str, at: float, took: float) -> JournalEntry:
        start = t0 + timedelta(seconds=at)
        return JournalEntry(
            key=key,
            node=key,
            status="completed",
            result=None,
            error=None,
            attempts=1,
            started_at=start,
            finished_at=start + timedelta(seconds=took),
        )

    run = Run(
        id="01RUN",
        workflow="wf",
        status=RunStatus.COMPLETED,
        input={},
        results={},
        result={},
        error=None,
        current_node=None,
        parent_id=None,
        created_at=t0,
        updated_at=t0,
        journal=(entry("a", 0.012, 0.003), entry("b", 42.5, 15), entry("c", 1800, 0)),
    )
    lines = timeline_lines(run)
    assert lines[0].split()[0] == "+12"
    assert lines[0].split()[1] == "ms"
    assert "+42.5 s" in lines[1]
    assert "15.0 s" in lines[1]
    assert "+30.0 min" in lines[2]


def _record(message: str, **fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("durable.runner", logging.WARNING, __file__, 1, message, (), None)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_field_formatter_appends_the_run_and_skips_what_the_message_says() -> None:
    fmt = FieldFormatter("%(levelname)s %(message)s")
    line = fmt.format(
        _record("charge attempt 1 failed", run_id="01A", workflow="order", node="charge", attempt=1)
    )
    assert (
        line == "WARNING charge attempt 1 failed [run_id=01A workflow=order node=charge attempt=1]"
    )
    said = fmt.format(_record("run 01A completed", run_id="01A", workflow="order"))
    assert said == "WARNING run 01A completed [workflow=order]"
    assert fmt.format(_record("plain")) == "WARNING plain"


def _engine() -> durable.Engine:
    raise AssertionError("never called by is_engine_factory")


async def _async_engine() -> durable.Engine:
    raise AssertionError("never called by is_engine_factory")


def _with_default(dsn: str = "x") -> durable.Engine:
    raise AssertionError("never called by is_engine_factory")


def _main() -> None:
    raise AssertionError("never called by is_engine_factory")


def _needs_an_argument(dsn: str) -> durable.Engine:
    raise AssertionError("never called by is_engine_factory")


def _unannotated():  # type: ignore[no-untyped-def]
    raise AssertionError("never called by is_engine_factory")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_engine, True),
        (_async_engine, True),
        (_with_default, True),
        (_main, False),
        (_needs_an_argument, False),
        (_unannotated, False),
        (print, False),
        (durable.Engine, False),  # the class itself: calling it needs a DSN or a pool
    ],
)
def test_only_annotated_zero_argument_functions_are_engine_factories(
    value: Any, expected: bool
) -> None:
    assert is_engine_factory(value) is expected
