"""The checked node each `Workflow` builder method declares (pure; no I/O)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from durable.errors import DefinitionError
from durable.flow import check_step_limit
from durable.nodes import (
    NO_DEFAULT,
    ChildWorkflow,
    Computed,
    Handler,
    Loop,
    Parallel,
    Route,
    Sleep,
    SleepUntil,
    Step,
    WaitForSignal,
    check_attempts,
    check_backoff,
    check_branches,
    check_callable,
    check_handler,
    check_seconds,
    check_timeout,
    check_when,
    validate_name,
)


def step_node(
    workflow: str,
    name: object,
    fn: object,
    max_attempts: object,
    backoff: object,
    compensate: object,
    timeout: object,
    transactional: object,
    limit: object,
    limit_key: object,
) -> Step:
    """`Workflow.step`'s node."""
    node_name = validate_name(name, "node")
    what = f"step {node_name!r} of workflow {workflow!r}"
    check_handler(fn, f"handler of {what}")
    if compensate is not None:
        check_handler(compensate, f"compensate of {what}")
    timeout = check_timeout(timeout, what)
    if not isinstance(transactional, bool):
        raise DefinitionError(f"{what}: transactional must be True or False")
    limit_name, key_fn = check_step_limit(limit, limit_key, what)
    return Step(
        name=node_name,
        kind="step",
        fn=fn,  # type: ignore[arg-type]
        max_attempts=check_attempts(max_attempts, what),
        backoff=check_backoff(backoff, what),
        compensate=compensate,  # type: ignore[arg-type]
        timeout=timeout,
        transactional=transactional,
        limit=limit_name,
        limit_key=key_fn,
    )


def sleep_node(workflow: str, name: str, seconds: Computed) -> Sleep:
    """`Workflow.sleep`'s node."""
    node_name = validate_name(name, "node")
    if not callable(seconds):
        check_seconds(seconds, f"sleep {node_name!r} of workflow {workflow!r}")
    return Sleep(name=node_name, kind="sleep", seconds=seconds)


def sleep_until_node(workflow: str, name: str, when: Computed) -> SleepUntil:
    """`Workflow.sleep_until`'s node."""
    node_name = validate_name(name, "node")
    if not callable(when):
        check_when(when, f"sleep_until {node_name!r} of workflow {workflow!r}")
    return SleepUntil(name=node_name, kind="sleep_until", when=when)


def wait_node(
    workflow: str, name: str, signal: Computed, timeout: float | None, default: Any
) -> WaitForSignal:
    """`Workflow.wait_for_signal`'s node."""
    node_name = validate_name(name, "node")
    what = f"wait_for_signal {node_name!r} of workflow {workflow!r}"
    if not callable(signal) and (not isinstance(signal, str) or not signal):
        raise DefinitionError(f"{what}: signal must be a non-empty name or a function")
    if default is not NO_DEFAULT:
        try:
            json.dumps(default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"{what}: default is not JSON-serializable: {exc}") from None
    return WaitForSignal(
        name=node_name,
        kind="wait_for_signal",
        signal=signal,
        timeout=check_timeout(timeout, what),
        default=default,
    )


def parallel_node(
    workflow: str,
    name: str,
    branches: object,
    max_attempts: int,
    backoff: object,
    compensate: Mapping[str, Handler] | None,
) -> Parallel:
    """`Workflow.parallel`'s node."""
    node_name = validate_name(name, "node")
    what = f"parallel {node_name!r} of workflow {workflow!r}"
    checked = check_branches(branches, what)
    compensators: dict[str, Handler] = {}
    for key, fn in (compensate or {}).items():
        if key not in checked:
            raise DefinitionError(f"{what}: compensate names unknown branch {key!r}")
        check_handler(fn, f"{what}: compensate of branch {key!r}")
        compensators[key] = fn
    return Parallel(
        name=node_name,
        kind="parallel",
        branches=checked,
        max_attempts=check_attempts(max_attempts, what),
        backoff=check_backoff(backoff, what),
        compensate=compensators,
    )


def route_node(
    workflow: str,
    name: str,
    select: Callable[..., Any],
    branches: object,
    max_attempts: int,
    backoff: object,
) -> Route:
    """`Workflow.route`'s node."""
    node_name = validate_name(name, "node")
    what = f"route {node_name!r} of workflow {workflow!r}"
    check_callable(select, f"{what}: select")
    return Route(
        name=node_name,
        kind="route",
        select=select,
        branches=check_branches(branches, what),
        max_attempts=check_attempts(max_attempts, what),
        backoff=check_backoff(backoff, what),
    )


def loop_node(
    workflow: str,
    name: str,
    condition: Callable[..., Any],
    body: Callable[..., Any],
    max_iterations: int,
    max_attempts: int,
    backoff: object,
) -> Loop:
    """`Workflow.loop`'s node."""
    node_name = validate_name(name, "node")
    what = f"loop {node_name!r} of workflow {workflow!r}"
    check_callable(condition, f"{what}: condition")
    check_handler(body, f"{what}: body")
    if (
        isinstance(max_iterations, bool)
        or not isinstance(max_iterations, int)
        or max_iterations < 0
    ):
        raise DefinitionError(
            f"{what}: max_iterations must be an integer >= 0, got {max_iterations!r}"
        )
    return Loop(
        name=node_name,
        kind="loop",
        condition=condition,
        body=body,
        max_iterations=max_iterations,
        max_attempts=check_attempts(max_attempts, what),
        backoff=check_backoff(backoff, what),
    )


def child_node(workflow: str, name: str, start: Callable[..., Any]) -> ChildWorkflow:
    """`Workflow.child_workflow`'s node."""
    node_name = validate_name(name, "node")
    check_callable(start, f"child_workflow {node_name!r} of workflow {workflow!r}: start")
    return ChildWorkflow(name=node_name, kind="child_workflow", start=start)
