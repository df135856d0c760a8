"""What a node handler receives: the run's input, earlier results and its transaction.

`async def` handlers get a `Context` (a `LoopContext` in a loop body), whose `conn` is the
asyncpg connection of the node's transaction. Plain `def` handlers run on the engine's
thread pool and get a `SyncContext` (`SyncLoopContext`), whose `conn` is a
`SyncConnection`: the same transaction, statement by statement, through the event loop.

Both are generic in the type of `input`: `Context[OrderIn]` for a workflow declared with
`Workflow("order", input=OrderIn)`, so a type checker knows `ctx.input.sku`. Without a type
argument, `input` is the JSON object the run was started with (`dict[str, Any]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

from durable.db import Connection

if TYPE_CHECKING:
    from durable.runtime.threads import SyncConnection

#: The type of a run's input: a workflow's `input=` model, else a JSON object.
In = TypeVar("In", default=dict[str, Any])


@dataclass(frozen=True, slots=True)
class Context(Generic[In]):
    """The view an `async def` handler has of its run.

    `input` is the run's input: an instance of the workflow's `input=` model, else the
    JSON object it was started with (a fresh copy for every handler). `results` maps the
    name of every completed node to its result (read-only; a handler whose return
    annotation is a dataclass or a pydantic model gives an instance of it). `attempt` is
    1-based. `conn` is the connection of the transaction the node commits in (None for
    `transactional=False` steps): writes through it commit atomically with the node's
    journal entry, or not at all.
    """

    input: In
    results: Mapping[str, Any]
    run_id: str
    workflow: str
    node: str
    attempt: int
    conn: Connection | None


@dataclass(frozen=True, slots=True)
class LoopContext(Context[In]):
    """The context of an `async def` loop body: a `Context` plus the 0-based `iteration`."""

    iteration: int = 0


@dataclass(frozen=True, slots=True)
class SyncContext(Generic[In]):
    """The view a plain `def` handler has of its run: a `Context` whose `conn` is a
    `SyncConnection` on the node's transaction (None for `transactional=False` steps).

    It runs on the engine's thread pool (`Engine(threads=...)`), so it may block (a
    synchronous SDK, `time.sleep`) without stopping the worker's other jobs.
    """

    input: In
    results: Mapping[str, Any]
    run_id: str
    workflow: str
    node: str
    attempt: int
    conn: SyncConnection | None


@dataclass(frozen=True, slots=True)
class SyncLoopContext(SyncContext[In]):
    """The context of a plain `def` loop body: a `SyncContext` plus the 0-based
    `iteration`."""

    iteration: int = 0


#: The run whose user code runs in this task (set by the runtime around every call of a
#: handler, select, condition or start function), so that a handler cancelling its own run
#: records the request instead of waiting for its own transaction.
current_run: ContextVar[str | None] = ContextVar("durable_current_run", default=None)
