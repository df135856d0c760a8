"""Workflow definitions: named, validated lists of nodes (pure; no I/O)."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from durable.errors import DefinitionError

if TYPE_CHECKING:
    from durable.context import Context, LoopContext

Handler = Callable[["Context"], Awaitable[Any]]
Backoff = float | int | Callable[[int], float] | None
H = TypeVar("H", bound=Handler)

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
_NO_DEFAULT: Any = object()


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


def _is_async(fn: object) -> bool:
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


def _check_handler(fn: object, what: str) -> None:
    if not callable(fn):
        raise DefinitionError(f"{what} must be an async function, got {fn!r}")
    if not _is_async(fn):
        raise DefinitionError(f"{what} must be defined with 'async def'")


def _check_backoff(backoff: object, what: str) -> Callable[[int], float]:
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


def _check_attempts(max_attempts: object, what: str) -> int:
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
    """A step: one async handler, retried, optionally compensated."""

    fn: Handler
    max_attempts: int
    backoff: Callable[[int], float]
    compensate: Handler | None
    timeout: float | None
    transactional: bool


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
    default: Any = field(default=_NO_DEFAULT)

    @property
    def has_default(self) -> bool:
        """True when a timeout completes the node with `default` instead of failing it."""
        return self.default is not _NO_DEFAULT


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

    select: Callable[[Context], Any]
    branches: Mapping[str, Handler]
    max_attempts: int
    backoff: Callable[[int], float]


@dataclass(frozen=True, eq=False)
class Loop(Node):
    """Run `body` while `condition(ctx, i)` holds; each iteration commits on its own."""

    condition: Callable[[Context, int], Any]
    body: Callable[[LoopContext], Awaitable[Any]]
    max_iterations: int
    max_attempts: int
    backoff: Callable[[int], float]


@dataclass(frozen=True, eq=False)
class ChildWorkflow(Node):
    """Start a child run (`start(ctx) -> (workflow, input)`) and wait for its result."""

    start: Callable[[Context], Any]


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise DefinitionError(f"{what} must be a function, got {fn!r}")


def _check_branches(branches: object, what: str) -> dict[str, Handler]:
    if not isinstance(branches, Mapping) or not branches:
        raise DefinitionError(f"{what}: branches must be a non-empty mapping of name -> handler")
    checked: dict[str, Handler] = {}
    for key, fn in branches.items():
        validate_name(key, f"{what}: branch")
        _check_handler(fn, f"{what}: branch {key!r}")
        checked[key] = fn
    return checked


def _check_timeout(timeout: object, what: str) -> float | None:
    if timeout is None:
        return None
    if not is_seconds(timeout, positive=True):
        raise DefinitionError(
            f"{what}: timeout must be a number of seconds > 0 and <= {MAX_WAIT:.0f}, "
            f"got {timeout!r}"
        )
    return float(timeout)  # type: ignore[arg-type]


class Workflow:
    """A named, ordered list of nodes. Build it with `step` and friends; register it with an
    `Engine`.

    Node names are unique within the workflow and may not contain `#` or `@`.
    """

    def __init__(self, name: str) -> None:
        self.name = validate_name(name, "workflow")
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._frozen: tuple[Node, ...] | None = None
        self._positions: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, nodes={[n.name for n in self._nodes]})"

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The declared nodes, in order."""
        if self._frozen is None or len(self._frozen) != len(self._nodes):
            self._frozen = tuple(self._nodes)
        return self._frozen

    def node(self, name: str) -> Node | None:
        """The node called `name`, or None."""
        position = self.position(name)
        return None if position is None else self._nodes[position]

    def position(self, name: str) -> int | None:
        """The index of the node called `name`, or None."""
        if self._positions is None or len(self._positions) != len(self._nodes):
            self._positions = {n.name: i for i, n in enumerate(self._nodes)}
        return self._positions.get(name)

    @property
    def shape(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """What a run of this workflow is pinned to: each node's name, kind and branch keys,
        in order (handler code is not part of it, so fixing a handler strands nothing)."""
        return tuple(
            (n.name, n.kind, tuple(getattr(n, "branches", None) or ())) for n in self.nodes
        )

    @property
    def queue(self) -> str:
        """The queue of this workflow's jobs: its name and a digest of its shape. Only a
        worker that registered this exact shape claims them, so an old worker never
        continues a run of newer code, nor a new worker a run of older code."""
        digest = hashlib.sha256(json.dumps(self.shape).encode()).hexdigest()[:12]
        return f"{self.name}@{digest}"

    def _add(self, node: Node) -> None:
        if node.name in self._names:
            raise DefinitionError(f"workflow {self.name!r} already has a node named {node.name!r}")
        self._names.add(node.name)
        self._nodes.append(node)

    @overload
    def step(self, name: H, /) -> H: ...

    @overload
    def step(
        self,
        name: str,
        fn: Handler,
        /,
        *,
        max_attempts: int = ...,
        backoff: Backoff = ...,
        compensate: Handler | None = ...,
        timeout: float | None = ...,
        transactional: bool = ...,
    ) -> Workflow: ...

    @overload
    def step(
        self,
        name: str | None = ...,
        fn: None = ...,
        /,
        *,
        max_attempts: int = ...,
        backoff: Backoff = ...,
        compensate: Handler | None = ...,
        timeout: float | None = ...,
        transactional: bool = ...,
    ) -> Callable[[H], H]: ...

    def step(
        self,
        name: str | Handler | None = None,
        fn: Handler | None = None,
        /,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
        compensate: Handler | None = None,
        timeout: float | None = None,
        transactional: bool = True,
    ) -> Any:
        """Declare a step.

        Forms: `wf.step("name", handler, ...)` (returns the workflow, to chain),
        `@wf.step` (the node is named after the function) and `@wf.step(name=None, **options)`.
        `max_attempts` counts all attempts (1 = no retry); `backoff` is seconds, a function of
        the failed attempt number, or None for `min(2 ** n, 60)`; `compensate` runs if a later
        node fails terminally; `timeout` bounds one attempt in seconds; `transactional=False`
        runs the handler outside any transaction under a heartbeat lease (`ctx.conn` is None).
        """
        if callable(name) and fn is None:
            handler = name
            self._add_step(
                handler.__name__, handler, max_attempts, backoff, compensate, timeout, transactional
            )
            return handler
        if fn is None:

            def decorator(handler: H) -> H:
                node_name = name if isinstance(name, str) else handler.__name__
                self._add_step(
                    node_name, handler, max_attempts, backoff, compensate, timeout, transactional
                )
                return handler

            return decorator
        self._add_step(name, fn, max_attempts, backoff, compensate, timeout, transactional)
        return self

    def _add_step(
        self,
        name: object,
        fn: object,
        max_attempts: object,
        backoff: object,
        compensate: object,
        timeout: object,
        transactional: object,
    ) -> None:
        node_name = validate_name(name, "node")
        what = f"step {node_name!r} of workflow {self.name!r}"
        _check_handler(fn, f"handler of {what}")
        if compensate is not None:
            _check_handler(compensate, f"compensate of {what}")
        timeout = _check_timeout(timeout, what)
        if not isinstance(transactional, bool):
            raise DefinitionError(f"{what}: transactional must be True or False")
        self._add(
            Step(
                name=node_name,
                kind="step",
                fn=fn,  # type: ignore[arg-type]
                max_attempts=_check_attempts(max_attempts, what),
                backoff=_check_backoff(backoff, what),
                compensate=compensate,  # type: ignore[arg-type]
                timeout=timeout,
                transactional=transactional,
            )
        )

    def sleep(self, name: str, seconds: Computed) -> Workflow:
        """Park the run for `seconds`: a number, or a (sync or async) function of the context.

        The wake time is computed once, on the database clock, and stored; no worker slot is
        held while the run sleeps.
        """
        node_name = validate_name(name, "node")
        if not callable(seconds):
            _check_seconds(seconds, f"sleep {node_name!r} of workflow {self.name!r}")
        self._add(Sleep(name=node_name, kind="sleep", seconds=seconds))
        return self

    def sleep_until(self, name: str, when: Computed) -> Workflow:
        """Park the run until `when`: an aware datetime, or a function of the context
        returning one."""
        node_name = validate_name(name, "node")
        if not callable(when):
            _check_when(when, f"sleep_until {node_name!r} of workflow {self.name!r}")
        self._add(SleepUntil(name=node_name, kind="sleep_until", when=when))
        return self

    def wait_for_signal(
        self,
        name: str,
        signal: Computed,
        *,
        timeout: float | None = None,
        default: Any = _NO_DEFAULT,
    ) -> Workflow:
        """Park the run until a signal called `signal` (or `signal(ctx)`) arrives.

        The signal's payload is the node's result. Signals sent earlier wait in the run's
        mailbox. After `timeout` seconds the node completes with `default` if one was given,
        else it fails (and compensation starts).
        """
        node_name = validate_name(name, "node")
        what = f"wait_for_signal {node_name!r} of workflow {self.name!r}"
        if not callable(signal) and (not isinstance(signal, str) or not signal):
            raise DefinitionError(f"{what}: signal must be a non-empty name or a function")
        if default is not _NO_DEFAULT:
            try:
                json.dumps(default, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise DefinitionError(f"{what}: default is not JSON-serializable: {exc}") from None
        self._add(
            WaitForSignal(
                name=node_name,
                kind="wait_for_signal",
                signal=signal,
                timeout=_check_timeout(timeout, what),
                default=default,
            )
        )
        return self

    def parallel(
        self,
        name: str,
        branches: Mapping[str, Handler],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
        compensate: Mapping[str, Handler] | None = None,
    ) -> Workflow:
        """Run every branch as its own job, possibly on different workers.

        Each branch commits its own journal row (`name#branch`) in its own transaction, with
        its own retry budget; the node completes when the last branch commits, with the
        result `{branch: result}`. `compensate` maps branch names to compensators.
        """
        node_name = validate_name(name, "node")
        what = f"parallel {node_name!r} of workflow {self.name!r}"
        checked = _check_branches(branches, what)
        compensators: dict[str, Handler] = {}
        for key, fn in (compensate or {}).items():
            if key not in checked:
                raise DefinitionError(f"{what}: compensate names unknown branch {key!r}")
            _check_handler(fn, f"{what}: compensate of branch {key!r}")
            compensators[key] = fn
        self._add(
            Parallel(
                name=node_name,
                kind="parallel",
                branches=checked,
                max_attempts=_check_attempts(max_attempts, what),
                backoff=_check_backoff(backoff, what),
                compensate=compensators,
            )
        )
        return self

    def route(
        self,
        name: str,
        select: Callable[[Context], Any],
        branches: Mapping[str, Handler],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
    ) -> Workflow:
        """Run the branch named by `select(ctx)` (sync or async).

        The choice is journaled once (`name@route`), so retries run the same branch. The
        result is `{"branch": key, "result": value}`; an unknown key fails the node.
        """
        node_name = validate_name(name, "node")
        what = f"route {node_name!r} of workflow {self.name!r}"
        _check_callable(select, f"{what}: select")
        self._add(
            Route(
                name=node_name,
                kind="route",
                select=select,
                branches=_check_branches(branches, what),
                max_attempts=_check_attempts(max_attempts, what),
                backoff=_check_backoff(backoff, what),
            )
        )
        return self

    def loop(
        self,
        name: str,
        condition: Callable[[Context, int], Any],
        body: Callable[[LoopContext], Awaitable[Any]],
        *,
        max_iterations: int = 1000,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
    ) -> Workflow:
        """Run `body` while `condition(ctx, i)` (sync or async) holds.

        Each iteration commits its own journal row (`name#i`) with its own retry budget; the
        node fails only if the condition still holds after `max_iterations` iterations. Its
        result is the list of iteration results (also `ctx.results[name]` while looping).
        """
        node_name = validate_name(name, "node")
        what = f"loop {node_name!r} of workflow {self.name!r}"
        _check_callable(condition, f"{what}: condition")
        _check_handler(body, f"{what}: body")
        if (
            isinstance(max_iterations, bool)
            or not isinstance(max_iterations, int)
            or max_iterations < 0
        ):
            raise DefinitionError(
                f"{what}: max_iterations must be an integer >= 0, got {max_iterations!r}"
            )
        self._add(
            Loop(
                name=node_name,
                kind="loop",
                condition=condition,
                body=body,
                max_iterations=max_iterations,
                max_attempts=_check_attempts(max_attempts, what),
                backoff=_check_backoff(backoff, what),
            )
        )
        return self

    def child_workflow(self, name: str, start: Callable[[Context], Any]) -> Workflow:
        """Start a child run and wait for it: `start(ctx)` (sync or async) returns
        `(workflow_name, input)`.

        The child is created in the same transaction as the parent's journal marker and wakes
        the parent when it ends: completed -> the child's result; failed or cancelled -> the
        node fails.
        """
        node_name = validate_name(name, "node")
        _check_callable(start, f"child_workflow {node_name!r} of workflow {self.name!r}: start")
        self._add(ChildWorkflow(name=node_name, kind="child_workflow", start=start))
        return self


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


def _check_seconds(seconds: object, what: str) -> float:
    if not is_seconds(seconds):
        raise DefinitionError(
            f"{what}: seconds must be a number >= 0 and <= {MAX_WAIT:.0f}, got {seconds!r}"
        )
    return float(seconds)  # type: ignore[arg-type]


def _check_when(when: object, what: str) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise DefinitionError(f"{what}: expected an aware datetime, got {when!r}")
    return when


async def resolve(value: Any, *args: Any) -> Any:
    """Return `value`, or call it with `args` (awaiting the result if it is awaitable)."""
    if not callable(value):
        return value
    out = value(*args)
    if inspect.isawaitable(out):
        out = await out
    return out
