"""Workflow definitions: named, validated lists of nodes (pure; no I/O)."""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from durable.errors import DefinitionError

if TYPE_CHECKING:
    from durable.context import Context

Handler = Callable[["Context"], Awaitable[Any]]
Backoff = float | int | Callable[[int], float] | None
H = TypeVar("H", bound=Handler)

RESERVED = ("#", "@")
MAX_NAME = 200
DEFAULT_MAX_ATTEMPTS = 3
MAX_BACKOFF = 60.0

NodeKind = Literal["step"]


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


class Workflow:
    """A named, ordered list of nodes. Build it with `step` and friends; register it with an
    `Engine`.

    Node names are unique within the workflow and may not contain `#` or `@`.
    """

    def __init__(self, name: str) -> None:
        self.name = validate_name(name, "workflow")
        self._nodes: list[Node] = []
        self._names: set[str] = set()

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, nodes={[n.name for n in self._nodes]})"

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The declared nodes, in order."""
        return tuple(self._nodes)

    def node(self, name: str) -> Node | None:
        """The node called `name`, or None."""
        for n in self._nodes:
            if n.name == name:
                return n
        return None

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
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise DefinitionError(
                f"{what}: timeout must be a number of seconds > 0, got {timeout!r}"
            )
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
                timeout=None if timeout is None else float(timeout),
                transactional=transactional,
            )
        )
