"""What a node handler receives: the run's input, earlier results and its transaction."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from durable.db import Connection


@dataclass(frozen=True, slots=True)
class Context:
    """The view a handler has of its run.

    `input` is the run's input; `results` maps the name of every completed node to its
    result (read-only); `attempt` is 1-based; `conn` is the connection of the transaction the
    node commits in (None for `transactional=False` steps): writes through it commit
    atomically with the node's journal entry, or not at all.
    """

    input: dict[str, Any]
    results: Mapping[str, Any]
    run_id: str
    workflow: str
    node: str
    attempt: int
    conn: Connection | None


@dataclass(frozen=True, slots=True)
class LoopContext(Context):
    """The context of a loop body: a `Context` plus the 0-based `iteration`."""

    iteration: int = 0


#: The run whose user code runs in this task (set by the runtime around every call of a
#: handler, select, condition or start function), so that a handler cancelling its own run
#: records the request instead of waiting for its own transaction.
current_run: ContextVar[str | None] = ContextVar("durable_current_run", default=None)
