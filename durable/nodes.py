"""Node declarations: the node dataclasses and the checks their options pass (pure; no I/O)."""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from durable.codec import returns
from durable.errors import DefinitionError

if TYPE_CHECKING:
    from durable.context import Context, LoopContext, SyncContext, SyncLoopContext

#: A node handler: `async def` (awaited on the event loop with a `Context`) or plain `def`
#: (run on the engine's threads with a `SyncContext`).
Handler = Callable[..., Any]
Backoff = float | int | Callable[[int], float] | None

RESERVED = ("#", "@")
MAX_NAME = 200
DEFAULT_MAX_ATTEMPTS = 3
MAX_BACKOFF = 60.0
#: The longest sleep, signal timeout or retry delay durable accepts (about 100 years): any
#: longer and a wake time could overflow a datetime.
MAX_WAIT = 100 * 365 * 86400.0

NodeKind = Literal[
    "step",
    "sleep",
    "sleep_until",
    "wait_for_signal",
    "parallel",
    "route",
    "loop",
    "child_workflow",
]
#: A value, or a sync or async function of the context that computes it.
Computed = Any
#: The `default` of a signal wait that has none: its timeout fails the node.
NO_DEFAULT: Any = object()


def default_backoff(failed_attempt: int) -> float:
    """Seconds to wait after failed attempt `n` (1-based): `min(2 ** n, 60)`."""
    return float(min(2**failed_attempt, MAX_BACKOFF))


def exponential(
    base: float = 1.0, factor: float = 2.0, cap: float = MAX_BACKOFF, jitter: bool = False
) -> Callable[[int], float]:
    """Build a backoff: `base * factor ** n` capped at `cap`; `jitter` draws from [0, delay]."""

    def backoff(failed_attempt: int) -> float:
        delay = min(base * factor**failed_attempt, cap)
        return random.uniform(0, delay) if jitter else delay

    return backoff


def is_async(fn: object) -> bool:
    """True for an `async def` function or an object whose `__call__` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    )


def validate_name(name: object, what: str) -> str:
    """Return `name` if it is a usable workflow or node name, else raise `DefinitionError`."""
    if not isinstance(name, str) or not name.strip():
        raise DefinitionError(f"{what} name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME:
        raise DefinitionError(f"{what} name {name[:40]!r}... is longer than {MAX_NAME} characters")
    if "\x00" in name:
        raise DefinitionError(f"{what} name {name!r} contains a NUL character")
    for ch in RESERVED:
        if ch in name:
            raise DefinitionError(
                f"{what} name {name!r} contains {ch!r}, which is reserved for journal keys"
            )
    return name


def check_handler(fn: object, what: str) -> None:
    """Raise `DefinitionError` unless `fn` is a function (`async def` or plain `def`) whose
    return annotation, if it names a dataclass or a pydantic model, can be stored."""
    if not callable(fn):
        raise DefinitionError(f"{what} must be a function, got {fn!r}")
    returns(fn, what)


def check_backoff(backoff: object, what: str) -> Callable[[int], float]:
    """The backoff function that `backoff` (seconds, a function or None) stands for."""
    if backoff is None:
        return default_backoff
    if isinstance(backoff, bool):
        raise DefinitionError(f"{what}: backoff must be seconds or a function, got {backoff!r}")
    if isinstance(backoff, int | float):
        if not math.isfinite(backoff) or backoff < 0:
            raise DefinitionError(f"{what}: backoff must be >= 0 seconds, got {backoff!r}")
        fixed = float(backoff)
        return lambda _n: fixed
    if callable(backoff):
        return backoff
    raise DefinitionError(f"{what}: backoff must be seconds or a function, got {backoff!r}")


def check_attempts(max_attempts: object, what: str) -> int:
    """Return `max_attempts` if it is an integer >= 1, else raise `DefinitionError`."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise DefinitionError(f"{what}: max_attempts must be an integer >= 1, got {max_attempts!r}")
    return max_attempts


@dataclass(frozen=True, eq=False)
class Node:
    """A declared node of a workflow; `name` is its journal key, `kind` what it does."""

    name: str
    kind: NodeKind


@dataclass(frozen=True, eq=False)
class Step(Node):
    """A step: one handler, retried, optionally compensated."""

    fn: Handler
    max_attempts: int
    backoff: Callable[[int], float]
    compensate: Handler | None
    timeout: float | None
    transactional: bool
    #: The engine's named `Limit` the step's attempts take a slot and a token of, and the
    #: function of the context that gives the key they count under (None: one for all).
    limit: str | None = None
    limit_key: Callable[[Context], Any] | None = None


@dataclass(frozen=True, eq=False)
class Sleep(Node):
    """Park the run for `seconds` (a number, or a function of the context)."""

    seconds: Computed


@dataclass(frozen=True, eq=False)
class SleepUntil(Node):
    """Park the run until an aware datetime (or a function of the context returning one)."""

    when: Computed


@dataclass(frozen=True, eq=False)
class WaitForSignal(Node):
    """Park the run until a signal of that name arrives; its payload is the result."""

    signal: Computed
    timeout: float | None
    default: Any = field(default=NO_DEFAULT)

    @property
    def has_default(self) -> bool:
        """True when a timeout completes the node with `default` instead of failing it."""
        return self.default is not NO_DEFAULT


@dataclass(frozen=True, eq=False)
class Parallel(Node):
    """Run every branch as its own job; the result is `{branch: result}`."""

    branches: Mapping[str, Handler]
    max_attempts: int
    backoff: Callable[[int], float]
    compensate: Mapping[str, Handler]


@dataclass(frozen=True, eq=False)
class Route(Node):
    """Run the one branch `select(ctx)` names; the choice is journaled once."""

    select: Callable[[Context[Any]], Any] | Callable[[SyncContext[Any]], Any]
    branches: Mapping[str, Handler]
    max_attempts: int
    backoff: Callable[[int], float]


@dataclass(frozen=True, eq=False)
class Loop(Node):
    """Run `body` while `condition(ctx, i)` holds; each iteration commits on its own."""

    condition: Callable[[Context[Any], int], Any] | Callable[[SyncContext[Any], int], Any]
    body: Callable[[LoopContext[Any]], Awaitable[Any]] | Callable[[SyncLoopContext[Any]], Any]
    max_iterations: int
    max_attempts: int
    backoff: Callable[[int], float]


@dataclass(frozen=True, eq=False)
class ChildWorkflow(Node):
    """Start a child run (`start(ctx) -> (workflow, input)`) and wait for its result."""

    start: Callable[[Context[Any]], Any] | Callable[[SyncContext[Any]], Any]


def check_callable(fn: object, what: str) -> None:
    """Raise `DefinitionError` unless `fn` is callable."""
    if not callable(fn):
        raise DefinitionError(f"{what} must be a function, got {fn!r}")


def check_branches(branches: object, what: str) -> dict[str, Handler]:
    """The branches as a dict, each name and handler checked (`DefinitionError` if bad)."""
    if not isinstance(branches, Mapping) or not branches:
        raise DefinitionError(f"{what}: branches must be a non-empty mapping of name -> handler")
    checked: dict[str, Handler] = {}
    for key, fn in branches.items():
        validate_name(key, f"{what}: branch")
        check_handler(fn, f"{what}: branch {key!r}")
        checked[key] = fn
    return checked


def check_timeout(timeout: object, what: str) -> float | None:
    """`timeout` in seconds as a float (None stays None); `DefinitionError` if out of range."""
    if timeout is None:
        return None
    if not is_seconds(timeout, positive=True):
        raise DefinitionError(
            f"{what}: timeout must be a number of seconds > 0 and <= {MAX_WAIT:.0f}, "
            f"got {timeout!r}"
        )
    return float(timeout)  # type: ignore[arg-type]


def is_seconds(value: object, *, positive: bool = False) -> bool:
    """True for a finite number of seconds up to `MAX_WAIT` (> 0 if `positive`, else >= 0);
    bools are not."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
        and value <= MAX_WAIT
    )


def check_seconds(seconds: object, what: str) -> float:
    """`seconds` as a float; `DefinitionError` unless it is a number from 0 to `MAX_WAIT`."""
    if not is_seconds(seconds):
        raise DefinitionError(
            f"{what}: seconds must be a number >= 0 and <= {MAX_WAIT:.0f}, got {seconds!r}"
        )
    return float(seconds)  # type: ignore[arg-type]


def check_when(when: object, what: str) -> datetime:
    """Return `when` if it is an aware datetime, else raise `DefinitionError`."""
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise DefinitionError(f"{what}: expected an aware datetime, got {when!r}")
    return when
