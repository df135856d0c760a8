"""Schedules: cron definitions and the decision of which ticks to fire (pure; no I/O).

Theory of operation. A schedule's row in the database keeps `next_at`, the first tick not
yet handled. A scheduler that holds the row (durable/scheduler.py) reads the database
clock and asks `plan()` what to do with the ticks between `next_at` and now: the newest
due tick is *on time* when it is at most `ON_TIME` old (a worker restarting, a deploy, a
slow pass), every other due tick was *missed* (no worker ran then) and `catch_up`
decides which of those still get a run. `plan()` also gives the new `next_at`, the first
tick after now. Ticks come from cronsim (Debian cron semantics, DST included) evaluated
in the schedule's IANA time zone: a fixed-time tick that falls in the hour skipped in
spring fires at the end of the gap, one in the hour repeated in autumn fires once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from durable.db import dumps
from durable.errors import DefinitionError
from durable.model import RunStatus
from durable.nodes import validate_name
from durable.workflow import Workflow

Overlap = Literal["skip", "allow", "cancel_previous"]
CatchUp = Literal["none", "latest", "all"]

#: How late the newest due tick may be and still count as on time rather than missed.
ON_TIME = timedelta(seconds=60)

#: The input key that carries the tick a run was started for.
SCHEDULED_AT = "scheduled_at"

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Far enough that no schedule reaches it: the next tick of an expression that has none.
_NEVER = datetime(9999, 1, 1, tzinfo=UTC)


class Cron:
    """A cron expression in an IANA time zone: the ticks it makes, as aware UTC datetimes.

    Five fields (minute hour day-of-month month day-of-week), or six with a leading
    seconds field, or a macro such as `@daily`; `L`, `W` and `#` as in cronsim.
    """

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise DefinitionError(f"cron must be a non-empty string, got {expression!r}")
        if not isinstance(timezone, str) or not timezone:
            raise DefinitionError(f"timezone must be an IANA zone name, got {timezone!r}")
        self.expression = expression.strip()
        self._expr = _MACROS.get(self.expression.lower(), self.expression)
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise DefinitionError(
                f"unknown time zone {timezone!r}: use an IANA name such as 'Europe/Paris' or 'UTC'"
            ) from None
        self.timezone = timezone
        try:
            CronSim(self._expr, datetime.now(self.zone))
        except CronSimError as exc:
            raise DefinitionError(f"invalid cron expression {expression!r}: {exc}") from None
        if self.next_after(datetime.now(UTC)) == _NEVER:
            raise DefinitionError(f"cron expression {expression!r} never fires")

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, {self.timezone!r})"

    def next_after(self, when: datetime) -> datetime:
        """The first tick strictly after `when` (aware)."""
        it = CronSim(self._expr, when.astimezone(self.zone))
        # Wall-clock matching can land before `when` inside the hour repeated in autumn.
        for _ in range(1000):
            try:
                tick = next(it).astimezone(UTC)
            except StopIteration:
                return _NEVER
            if tick > when:
                return tick
        return _NEVER

    def back_from(self, when: datetime, *, since: datetime, limit: int) -> list[datetime]:
        """Up to `limit` ticks `t` with `since <= t <= when`, newest first."""
        it = CronSim(self._expr, (when + timedelta(microseconds=1)).astimezone(self.zone), True)
        ticks: list[datetime] = []
        while len(ticks) < limit:
            try:
                tick = next(it).astimezone(UTC)
            except StopIteration:
                break
            if tick < since:
                break
            if tick <= when and (not ticks or tick < ticks[-1]):
                ticks.append(tick)
        return ticks

    def local(self, tick: datetime) -> datetime:
        """`tick` in the schedule's time zone."""
        return tick.astimezone(self.zone)


@dataclass(frozen=True)
class Plan:
    """What a scheduler does with a schedule whose ticks are due.

    `fire`: the ticks that get a run, oldest first. `dropped`: due ticks that get none
    (counted up to the look-back bound; `more` says older ones exist). `next_at`: the
    first tick after now, the row's new `next_at`.
    """

    fire: tuple[datetime, ...]
    dropped: int
    more: bool
    next_at: datetime


def plan(
    cron: Cron,
    *,
    next_at: datetime,
    now: datetime,
    catch_up: CatchUp,
    max_catch_up: int,
) -> Plan:
    """Decide which due ticks (`next_at <= t <= now`) get a run under `catch_up`."""
    if now < next_at:
        return Plan((), 0, False, next_at)
    # The newest tick, and as many missed ones before it as `catch_up` could run.
    limit = max_catch_up + 1 if catch_up == "all" else 1
    recent = cron.back_from(now, since=next_at, limit=limit + 1)
    more = len(recent) > limit
    recent = recent[:limit]
    current = recent[0] if recent and now - recent[0] <= ON_TIME else None
    missed = recent[1:] if current is not None else recent
    if catch_up == "none":
        chosen = []
    elif catch_up == "latest":
        chosen = missed[:1] if current is None else []
    else:
        chosen = missed[:max_catch_up]
    fire = sorted(chosen + ([current] if current is not None else []))
    return Plan(tuple(fire), len(recent) - len(fire), more, cron.next_after(now))


@dataclass(frozen=True, eq=False)
class Schedule:
    """A cron schedule that starts runs of a workflow; give it to `Engine(schedules=[...])`.

    `cron`: five fields (minute hour day-of-month month day-of-week), six with a leading
    seconds field, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`; evaluated in
    `timezone` (an IANA name; DST as Debian cron: a fixed-time tick in the hour skipped in
    spring fires when the gap ends, one in the repeated hour fires once). Every tick starts
    exactly one run, whatever the number of workers; the run's input is `input` plus
    `scheduled_at`, the tick in ISO 8601 with the zone's offset.

    `overlap`: when the schedule's previous run is still active at a tick, `"skip"` the
    tick, `"allow"` a second run, or `"cancel_previous"` (cancel it, then start).
    `catch_up`: for ticks missed while no worker ran (a tick more than a minute old when a
    scheduler sees it), `"none"`, `"latest"` (one run for the most recent one) or `"all"`
    (the `max_catch_up` most recent ones). Raises `DefinitionError` on a bad value.
    """

    name: str
    cron: str
    workflow: str
    input: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    overlap: Overlap = "skip"
    catch_up: CatchUp = "latest"
    max_catch_up: int = 100
    _cron: Cron = field(init=False, repr=False)

    def __init__(
        self,
        name: str,
        *,
        cron: str,
        workflow: str | Workflow,
        input: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        overlap: Literal["skip", "allow", "cancel_previous"] = "skip",
        catch_up: Literal["none", "latest", "all"] = "latest",
        max_catch_up: int = 100,
    ) -> None:
        validate_name(name, "schedule")
        # The engine checks that the workflow is registered.
        workflow_name = workflow.name if isinstance(workflow, Workflow) else workflow
        validate_name(workflow_name, "workflow")
        if overlap not in get_args(Overlap):
            raise DefinitionError(
                f"overlap must be one of {', '.join(map(repr, get_args(Overlap)))}, got {overlap!r}"
            )
        if catch_up not in get_args(CatchUp):
            raise DefinitionError(
                f"catch_up must be one of {', '.join(map(repr, get_args(CatchUp)))}, "
                f"got {catch_up!r}"
            )
        if isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int):
            raise DefinitionError(f"max_catch_up must be an integer, got {max_catch_up!r}")
        if not 1 <= max_catch_up <= 10_000:
            raise DefinitionError(f"max_catch_up must be between 1 and 10000, got {max_catch_up}")
        if input is None:
            input = {}
        if not isinstance(input, Mapping):
            raise DefinitionError(f"input must be a mapping, got {type(input).__name__}")
        if SCHEDULED_AT in input:
            raise DefinitionError(
                f"input of schedule {name!r} must not have the key {SCHEDULED_AT!r}: "
                "each run gets its tick there"
            )
        dumps(dict(input), f"input of schedule {name!r}")
        parsed = Cron(cron, timezone)
        for attr, value in (
            ("name", name),
            ("cron", parsed.expression),
            ("workflow", workflow_name),
            ("input", dict(input)),
            ("timezone", timezone),
            ("overlap", overlap),
            ("catch_up", catch_up),
            ("max_catch_up", max_catch_up),
            ("_cron", parsed),
        ):
            object.__setattr__(self, attr, value)

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after the aware datetime `after`, in UTC."""
        return self._cron.next_after(after)

    def run_input(self, tick: datetime) -> dict[str, Any]:
        """The input of the run for `tick`: `input` plus `scheduled_at` (ISO 8601, local)."""
        return {**self.input, SCHEDULED_AT: self._cron.local(tick).isoformat()}


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as the database keeps it (`Engine.schedules()`).

    `next_at`: the next tick that will fire (None while paused). `last_tick`: the tick of
    the latest run it started (a trigger's is the time of the trigger), `last_run_id` and
    `last_run_status` that run (None once purged).
    """

    name: str
    workflow: str
    cron: str
    timezone: str
    input: dict[str, Any]
    overlap: str
    catch_up: str
    max_catch_up: int
    paused: bool
    next_at: datetime | None
    last_tick: datetime | None
    last_run_id: str | None
    last_run_status: RunStatus | None
    created_at: datetime
    updated_at: datetime
