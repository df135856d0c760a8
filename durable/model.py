"""The public data of a run: `RunStatus` and the `Run` snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class RunStatus(StrEnum):
    """Where a run is in its life. `completed`, `failed` and `cancelled` are final."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for the final statuses."""
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


@dataclass(frozen=True)
class JournalEntry:
    """One committed outcome of a run: a node, branch, iteration or compensation."""

    key: str
    node: str
    status: str
    result: Any
    error: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime


@dataclass(frozen=True)
class Attempt:
    """A failed attempt of a node, kept for retries and the timeline."""

    key: str
    attempt: int
    error: str
    started_at: datetime | None
    failed_at: datetime


@dataclass(frozen=True)
class Run:
    """A snapshot of a run. `results` maps each completed node to its result; `result` is
    set when the run completed (the mapping of every node's result); `version` is the
    version of its workflow the run is pinned to. `input`, `results` and `result` are JSON,
    as stored: a typed input or result is the object its model encodes to. `paused`: an
    operator paused it (`Engine.pause_run`); `forked_from`: the run it was forked from."""

    id: str
    workflow: str
    status: RunStatus
    input: dict[str, Any]
    results: dict[str, Any]
    result: Any
    error: str | None
    current_node: str | None
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    children: tuple[str, ...] = ()
    paused: bool = False
    forked_from: str | None = None
    # The version of its workflow the run is pinned to (with that version's shape).
    version: int = 1
    journal: tuple[JournalEntry, ...] = field(default=(), repr=False)
    attempts: tuple[Attempt, ...] = field(default=(), repr=False)
