"""What a node decides, as data: the transitions a run can make, and the run as read.

Plain data and pure helpers, no I/O. A node module reads a `RunState`, runs the user's
callables through a `Visit`, and returns one of the transitions below; `apply` turns it
into the one SQL call that journals it, moves the run and ensures its jobs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from durable.codec import Codec
from durable.context import Context
from durable.db import dumps
from durable.errors import NonRetryable, SerializationError
from durable.workflow import MAX_WAIT, Workflow, default_backoff

log = logging.getLogger("durable.runtime")

#: Error texts are stored and shown; a handler's exception may carry megabytes.
MAX_ERROR = 8000


@dataclass(frozen=True, slots=True)
class RunState:
    """A run as a worker read it with its job locked: the run row, and what the claim read
    with it (the database clock, the results of completed nodes, the journal row of the
    job's own key if it committed already, a cancel request)."""

    job_id: int
    task: str
    branch: str | None
    run_id: str
    lease_token: Any
    workflow: str
    status: str
    input: Any
    cursor: int
    current_node: str | None
    iteration: int
    attempt: int
    epoch: int
    wake_at: datetime | None
    waiting_for: str | None
    child_id: str | None
    branches: tuple[str, ...] | None
    error: str | None
    parent_id: str | None
    ending: str | None
    now: datetime
    results: Mapping[str, Any]
    replay: str | None
    cancel: str | None


@dataclass(frozen=True, slots=True)
class Ok:
    """A user callable returned `value` (`text`: its JSON, when it must be stored)."""

    value: Any
    text: str


@dataclass(frozen=True, slots=True)
class Err:
    """A user callable failed with `error` (its writes through `ctx.conn` rolled back)."""

    error: BaseException


Outcome = Ok | Err


@dataclass(frozen=True, slots=True)
class Signal:
    """The oldest unconsumed signal of a name in a run's mailbox."""

    id: int
    payload: str


@dataclass(frozen=True, slots=True)
class Child:
    """A child run as its parent sees it."""

    status: str
    result: str | None
    error: str | None


class Visit(Protocol):
    """What a node module may do while it decides: read, and run the user's callables."""

    state: RunState

    def context(self, node: str, *, results: Mapping[str, Any] | None = None) -> Context[Any]:
        """The handler context for `node` (key `node` of this run)."""
        ...

    async def call(
        self,
        what: str,
        ctx: Context[Any],
        call: Callable[[], Awaitable[Any]],
        *,
        timeout: float | None = None,
        store: bool = True,
        returns: Codec | None = None,
    ) -> Outcome:
        """Run user code as one attempt (savepoint, time limit, every exception caught);
        a stored value is encoded by `returns` when the handler's result is typed."""
        ...

    async def invoke(self, fn: Callable[..., Any], ctx: Context[Any], *args: Any) -> Any:
        """Call user function `fn(ctx, *args)`: awaited if it is `async def`, else run on the
        engine's threads with a `SyncContext`. Use it inside `call`."""
        ...

    async def journal(self, key: str) -> str | None:
        """The stored result of journal row `key` if it completed, else None."""
        ...

    async def sub_results(self, node: str) -> dict[str, str]:
        """The committed branches or iterations of `node`: {suffix after '#': result}."""
        ...

    async def iterations(self, node: str) -> list[Any]:
        """The results of the committed iterations of loop `node`, in order (as many as the
        run's `iteration`)."""
        ...

    async def oldest_signal(self, name: str) -> Signal | None:
        """The oldest unconsumed signal `name` of this run."""
        ...

    async def child(self, run_id: str) -> Child | None:
        """A child run's status and outcome (None when it was purged)."""
        ...

    def workflow(self, name: str) -> Workflow | None:
        """The registered workflow of that name, for a child run."""
        ...

    async def acquire(self, limit: str, key: str, lease: Any = None) -> datetime | None:
        """Take a slot and a token of named limit `limit` for `key` for this attempt (held
        until its transaction ends, or while lease token `lease` lives); None when taken,
        else when to try again."""
        ...


# -- transitions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Complete:
    """The node completed with JSON `text`; `replay`: it was in the journal already;
    `consume`: the signal it took; `note`: what the journal row should say of how (a signal
    wait that timed out and took its default)."""

    text: str
    replay: bool = False
    consume: int | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempt `attempt` of `key` failed; the next one is due after `delay` seconds."""

    key: str
    attempt: int
    error: str
    delay: float
    cause: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Fail:
    """The node failed for good (attempt `attempt` of `key`, if it was an attempt)."""

    error: str
    key: str | None = None
    attempt: int = 1
    cause: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Park:
    """The run waits: until `wake_at`, for signal `signal`, or both."""

    wake_at: datetime | None
    signal: str | None = None


@dataclass(frozen=True, slots=True)
class Iterate:
    """Loop iteration `index` committed with JSON `text`; the next one comes."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class FanOut:
    """A parallel node starts (or resumes) its branches."""

    branches: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BranchDone:
    """A branch committed with JSON `text`."""

    branch: str
    text: str


@dataclass(frozen=True, slots=True)
class Choose:
    """A route chose `branch`; the choice commits before the branch runs."""

    branch: str


@dataclass(frozen=True, slots=True)
class StartChild:
    """Start a child run of `workflow` with JSON input `input` (counted under
    `concurrency_key` when its workflow has a bound)."""

    workflow: Workflow
    input: str
    concurrency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """Run a `transactional=False` step outside any transaction, under lease `token`."""

    token: Any


@dataclass(frozen=True, slots=True)
class WaitLimit:
    """The step cannot get a slot or a token of limit slot set `wait` (name and key): it
    tries again at `wake_at` (or sooner, when a holder lets go), without an attempt."""

    wake_at: datetime
    wait: str


@dataclass(frozen=True, slots=True)
class Admit:
    """The run takes a slot of its workflow's bound, or is queued for one."""


@dataclass(frozen=True, slots=True)
class Compensated:
    """A compensator of journal row `key` (node `node`) ended `status`."""

    key: str
    node: str
    status: str
    text: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Compensation is over: the run ends `status` (failed or cancelled)."""

    status: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Apply a cancel request: compensate, or end the run cancelled."""

    reason: str


@dataclass(frozen=True, slots=True)
class Noop:
    """Nothing to do (a stale or early job): the run keeps its state, its jobs are ensured."""

    reason: str


Transition = (
    Complete
    | Retry
    | Fail
    | Park
    | Iterate
    | FanOut
    | BranchDone
    | Choose
    | StartChild
    | Lease
    | WaitLimit
    | Admit
    | Compensated
    | Finish
    | Cancel
    | Noop
)


# -- pure helpers --------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """An exception as storable text: `Type: message`, without NUL or lone surrogates
    (PostgreSQL refuses both), at most `MAX_ERROR` characters."""
    try:
        message = str(exc)
    except Exception:  # a user exception whose __str__ raises
        message = "<unprintable message>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def to_json(value: Any, what: str) -> str:
    """JSON text of `value` as stored, or `SerializationError` naming `what`."""
    return dumps(value, what)


def stored(text: str) -> Any:
    """A result as the next node sees it: decoded from its stored JSON."""
    return json.loads(text)


def after_failure(
    state: RunState,
    key: str,
    exc: BaseException,
    max_attempts: int,
    backoff: Callable[[int], float],
    attempt: int | None = None,
) -> Retry | Fail:
    """Retry attempt `attempt` of `key` after its backoff, or fail the node for good.

    `NonRetryable` and unstorable results fail at once. A backoff function that raises or
    returns nonsense does not stop the retry: the default backoff is used and the error
    text says so.
    """
    attempt = state.attempt if attempt is None else attempt
    error = describe(exc)
    if isinstance(exc, NonRetryable | SerializationError) or attempt >= max_attempts:
        return Fail(error, key, attempt, exc)
    try:
        delay = float(backoff(attempt))
        if not 0 <= delay <= MAX_WAIT:
            raise ValueError(f"backoff returned {delay!r} seconds")
    except Exception as bad:
        log.warning(
            "backoff of %s raised %s; using the default backoff",
            key,
            describe(bad),
            extra={"run_id": state.run_id, "node": key},
        )
        delay = default_backoff(attempt)
        error = describe(exc)[: MAX_ERROR - 200] + f" (backoff failed: {describe(bad)[:150]})"
    return Retry(key, attempt, error, delay, exc)


def gathered(parts: Mapping[str, str], order: tuple[str, ...], what: str) -> str:
    """The JSON of `{key: result}` in `order`, from stored JSON results."""
    return dumps({k: json.loads(parts[k]) for k in order}, what)


async def computed(v: Visit, what: str, ctx: Context[Any], value: Any) -> Outcome:
    """A node option that is a value or a function of the context: a value is taken as it
    is; a function runs as an attempt of the node."""
    if not callable(value):
        return Ok(value, "")
    return await v.call(what, ctx, lambda: v.invoke(value, ctx), store=False)
