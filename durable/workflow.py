"""Workflow definitions: named, validated lists of nodes (pure; no I/O)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar, overload

from durable.codec import Codec, model_codec
from durable.context import Context, In, LoopContext, SyncContext, SyncLoopContext
from durable.declare import (
    child_node,
    loop_node,
    parallel_node,
    route_node,
    sleep_node,
    sleep_until_node,
    step_node,
    wait_node,
)
from durable.errors import DefinitionError
from durable.flow import check_concurrency
from durable.nodes import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_WAIT,
    NO_DEFAULT,
    Backoff,
    ChildWorkflow,
    Computed,
    Handler,
    Loop,
    Node,
    Parallel,
    Route,
    Sleep,
    SleepUntil,
    Step,
    WaitForSignal,
    default_backoff,
    exponential,
    is_seconds,
    validate_name,
)

# The node types and helpers the runtime reads through this module, beside the builder.
__all__ = [
    "MAX_WAIT",
    "ChildWorkflow",
    "Handler",
    "Loop",
    "Node",
    "Parallel",
    "Route",
    "Sleep",
    "SleepUntil",
    "Step",
    "WaitForSignal",
    "Workflow",
    "default_backoff",
    "exponential",
    "is_seconds",
]

H = TypeVar("H", bound=Handler)

# What a `Workflow[In]` takes, for type checkers: `async def` functions of a `Context[In]`,
# plain `def` functions of a `SyncContext[In]` (run on the engine's threads).
NodeHandler = Callable[[Context[In]], Awaitable[Any]] | Callable[[SyncContext[In]], Any]
LoopBody = Callable[[LoopContext[In]], Awaitable[Any]] | Callable[[SyncLoopContext[In]], Any]
Decide = Callable[[Context[In]], Any] | Callable[[SyncContext[In]], Any]
Condition = Callable[[Context[In], int], Any] | Callable[[SyncContext[In], int], Any]


class Workflow(Generic[In]):
    """A named, ordered list of nodes. Build it with `step` and friends; register it with an
    `Engine`.

    Node names are unique within the workflow and may not contain `#` or `@`. `version`
    (an integer >= 1, default 1) lets several definitions of one name be served side by
    side: a run is pinned at start to its workflow's name, version and shape, and only a
    worker that registered that exact triple continues it.

    `input`: a dataclass or a pydantic model class (pydantic is optional). `start()` then
    validates the input (a mapping or an instance) and stores its JSON form, and handlers
    get `ctx.input` as an instance: annotate them `ctx: durable.Context[Model]` and a type
    checker knows its fields. Without it, the input is a JSON object (`dict[str, Any]`).

    `concurrency`: at most that many runs of the workflow are active (started, not
    finished) at once, per `concurrency_key(input)` when given (evaluated once, at start,
    on the input's JSON form); the others stay `pending` and start in priority, then FIFO,
    order as slots free.
    """

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        input: type[In] | None = None,
        concurrency: int | None = None,
        concurrency_key: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.name = validate_name(name, "workflow")
        self.concurrency, self.concurrency_key = check_concurrency(
            concurrency, concurrency_key, f"workflow {self.name!r}"
        )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DefinitionError(
                f"workflow {self.name!r}: version must be an integer >= 1, got {version!r}"
            )
        self.version = version
        #: Converts the run's input to and from the `input=` model (None: a JSON object).
        self.input_codec: Codec | None = (
            None if input is None else model_codec(input, f"workflow {self.name!r}")
        )
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._frozen: tuple[Node, ...] | None = None
        self._positions: dict[str, int] | None = None
        self._queue: tuple[tuple[Node, ...], str] | None = None

    def __repr__(self) -> str:
        return (
            f"Workflow({self.name!r}, version={self.version}, "
            f"nodes={[n.name for n in self._nodes]})"
        )

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
        """The queue of this workflow's jobs: its name, version and a digest of its shape
        (`order@3f2a...` for version 1, `order@v2@9c41...` for later ones, so that runs of
        version 1 keep the queue they had before versions existed). Only a worker that
        registered this exact triple claims them, so an old worker never continues a run of
        newer code, nor a new worker a run of older code. The claim filters on this one
        column; `queue_version_v1` in sql/functions.sql reads the version back."""
        nodes = self.nodes
        if self._queue is None or self._queue[0] is not nodes:  # computed once per shape
            digest = hashlib.sha256(json.dumps(self.shape).encode()).hexdigest()[:12]
            version = "" if self.version == 1 else f"v{self.version}@"
            self._queue = (nodes, f"{self.name}@{version}{digest}")
        return self._queue[1]

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
        fn: NodeHandler[In],
        /,
        *,
        max_attempts: int = ...,
        backoff: Backoff = ...,
        compensate: NodeHandler[In] | None = ...,
        timeout: float | None = ...,
        transactional: bool = ...,
        limit: str | None = ...,
        limit_key: Callable[[Context], Any] | None = ...,
    ) -> Workflow[In]: ...

    @overload
    def step(
        self,
        name: str | None = ...,
        fn: None = ...,
        /,
        *,
        max_attempts: int = ...,
        backoff: Backoff = ...,
        compensate: NodeHandler[In] | None = ...,
        timeout: float | None = ...,
        transactional: bool = ...,
        limit: str | None = ...,
        limit_key: Callable[[Context], Any] | None = ...,
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
        limit: str | None = None,
        limit_key: Callable[[Context], Any] | None = None,
    ) -> Any:
        """Declare a step.

        Forms: `wf.step("name", handler, ...)` (returns the workflow, to chain),
        `@wf.step` (the node is named after the function) and `@wf.step(name=None, **options)`.
        The handler is an `async def` function of a `Context`, or a plain `def` function of
        a `SyncContext` (run on the engine's threads); a return annotation naming a dataclass
        or a pydantic model makes later nodes see its result as an instance.
        `max_attempts` counts all attempts (1 = no retry); `backoff` is seconds, a function of
        the failed attempt number, or None for `min(2 ** n, 60)`; `compensate` runs if a later
        node fails terminally; `timeout` bounds one attempt in seconds; `transactional=False`
        runs the handler outside any transaction under a heartbeat lease (`ctx.conn` is None).
        `limit` names a `durable.Limit` of the engine: each attempt takes a slot and a token
        of it first (per `limit_key(ctx)` when given), and waits, without using an attempt,
        while there is none.
        """
        options = (max_attempts, backoff, compensate, timeout, transactional, limit, limit_key)
        if callable(name) and fn is None:
            handler = name
            self._add(step_node(self.name, handler.__name__, handler, *options))
            return handler
        if fn is None:

            def decorator(handler: H) -> H:
                node_name = name if isinstance(name, str) else handler.__name__
                self._add(step_node(self.name, node_name, handler, *options))
                return handler

            return decorator
        self._add(step_node(self.name, name, fn, *options))
        return self

    def sleep(self, name: str, seconds: Computed) -> Workflow[In]:
        """Park the run for `seconds`: a number, or a (sync or async) function of the context.

        The wake time is computed once, on the database clock, and stored; no worker slot is
        held while the run sleeps.
        """
        self._add(sleep_node(self.name, name, seconds))
        return self

    def sleep_until(self, name: str, when: Computed) -> Workflow[In]:
        """Park the run until `when`: an aware datetime, or a function of the context
        returning one."""
        self._add(sleep_until_node(self.name, name, when))
        return self

    def wait_for_signal(
        self,
        name: str,
        signal: Computed,
        *,
        timeout: float | None = None,
        default: Any = NO_DEFAULT,
    ) -> Workflow[In]:
        """Park the run until a signal called `signal` (or `signal(ctx)`) arrives.

        The signal's payload is the node's result. Signals sent earlier wait in the run's
        mailbox. After `timeout` seconds the node completes with `default` if one was given,
        else it fails (and compensation starts).
        """
        self._add(wait_node(self.name, name, signal, timeout, default))
        return self

    def parallel(
        self,
        name: str,
        branches: Mapping[str, NodeHandler[In]],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
        compensate: Mapping[str, NodeHandler[In]] | None = None,
    ) -> Workflow[In]:
        """Run every branch as its own job, possibly on different workers.

        Each branch commits its own journal row (`name#branch`) in its own transaction, with
        its own retry budget; the node completes when the last branch commits, with the
        result `{branch: result}`. `compensate` maps branch names to compensators.
        """
        self._add(parallel_node(self.name, name, branches, max_attempts, backoff, compensate))
        return self

    def route(
        self,
        name: str,
        select: Decide[In],
        branches: Mapping[str, NodeHandler[In]],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
    ) -> Workflow[In]:
        """Run the branch named by `select(ctx)` (sync or async).

        The choice is journaled once (`name@route`), so retries run the same branch. The
        result is `{"branch": key, "result": value}`; an unknown key fails the node.
        """
        self._add(route_node(self.name, name, select, branches, max_attempts, backoff))
        return self

    def loop(
        self,
        name: str,
        condition: Condition[In],
        body: LoopBody[In],
        *,
        max_iterations: int = 1000,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = None,
    ) -> Workflow[In]:
        """Run `body` while `condition(ctx, i)` (sync or async) holds.

        Each iteration commits its own journal row (`name#i`) with its own retry budget; the
        node fails only if the condition still holds after `max_iterations` iterations. Its
        result is the list of iteration results (also `ctx.results[name]` while looping).
        """
        self._add(
            loop_node(self.name, name, condition, body, max_iterations, max_attempts, backoff)
        )
        return self

    def child_workflow(self, name: str, start: Decide[In]) -> Workflow[In]:
        """Start a child run and wait for it: `start(ctx)` (sync or async) returns
        `(workflow_name, input)`.

        The child is created in the same transaction as the parent's journal marker and wakes
        the parent when it ends: completed -> the child's result; failed or cancelled -> the
        node fails.
        """
        self._add(child_node(self.name, name, start))
        return self
